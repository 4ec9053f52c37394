import { attempt, el, flash, get, patch, post, requireLogin } from "./api.js";

const me = await requireLogin();

let plans = [];
const $ = (id) => document.getElementById(id);
const path = (name) => `/admin/accounts/${encodeURIComponent(name)}`;

function planSelect(account) {
  const select = el("select", { "aria-label": `plan of ${account.name}` },
    plans.map((p) => el("option", { value: p.name, selected: p.name === account.plan }, p.name)));
  select.addEventListener("change", () => attempt(async () => {
    await patch(path(account.name), { plan: select.value });
    await load();
  }));
  return select;
}

function grantForm(account) {
  const amount = el("input", { size: 6, placeholder: "credits", "aria-label": `credits for ${account.name}` });
  const form = el("form", { class: "grant" }, amount, el("button", { type: "submit" }, "Grant"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => {
      await post(`${path(account.name)}/credits`, { amount: amount.value.trim(), note: "granted in the dashboard" });
      await load();
      flash(`Granted ${amount.value} credits to ${account.name}.`, "ok");
    });
  });
  return form;
}

function statusButton(account) {
  const suspend = account.status === "active";
  const button = el("button", { type: "button", class: suspend ? "danger" : "" }, suspend ? "Disable" : "Enable");
  button.addEventListener("click", () => attempt(async () => {
    await patch(path(account.name), { status: suspend ? "suspended" : "active" });
    await load();
  }));
  return button;
}

function row(account) {
  return el(
    "tr",
    { "data-account": account.name },
    el("td", {}, account.name),
    el("td", {}, account.email || "—"),
    el("td", {}, planSelect(account)),
    el("td", {}, el("span", { class: `badge ${account.status}` }, account.status)),
    el("td", { class: "num balance" }, account.balance),
    el("td", {}, account.is_admin ? "yes" : ""),
    el("td", {}, grantForm(account)),
    el("td", {}, account.name === me.account ? "" : statusButton(account)),
  );
}

async function load() {
  const accounts = (await get("/admin/accounts")).data;
  $("accounts").querySelector("tbody").replaceChildren(...accounts.map(row));
  const count = (plan) => accounts.filter((a) => a.plan === plan).length;
  const limit = (n) => (n == null ? "no limit" : n.toLocaleString());
  $("plans").querySelector("tbody").replaceChildren(...plans.map((p) => el("tr", {},
    el("td", {}, p.name), el("td", { class: "num" }, limit(p.requests_per_minute)),
    el("td", { class: "num" }, limit(p.tokens_per_minute)), el("td", { class: "num" }, count(p.name)))));
}

$("new-account").addEventListener("submit", (event) => {
  event.preventDefault();
  attempt(async () => {
    const body = { name: $("account-name").value, plan: $("account-plan").value,
      credits: $("account-credits").value || "0", is_admin: $("account-admin").checked };
    if ($("account-email").value) {
      body.email = $("account-email").value;
      body.password = $("account-password").value;
    }
    await post("/admin/accounts", body);
    event.target.reset();
    await load();
    flash(`Account ${body.name} created.`, "ok");
  });
});

if (!me.is_admin) {
  flash("This page is for admin accounts.");
} else {
  await attempt(start);
}

async function start() {
  plans = (await get("/v1/dashboard/plans")).data;
  $("account-plan").replaceChildren(...plans.map((p) => el("option", { value: p.name }, p.name)));
  await load();
  document.body.dataset.loaded = "1";
}
