import { attempt, copy, el, get, patch, post, requireLogin, time } from "./api.js";

await requireLogin();
const tbody = document.querySelector("#keys tbody");

function state(key) {
  return key.revoked ? "revoked" : key.enabled ? "enabled" : "disabled";
}

/** A button that asks for a second click before it acts. */
function confirmButton(label, question, action) {
  const button = el("button", { type: "button", class: "danger" }, label);
  button.addEventListener("click", () => {
    if (button.dataset.armed) return action();
    button.dataset.armed = "1";
    button.textContent = question;
    setTimeout(() => {
      delete button.dataset.armed;
      button.textContent = label;
    }, 4000);
  });
  return button;
}

function nameCell(key) {
  const cell = el("td", { class: "key-name" }, key.name || "—");
  if (key.revoked) return cell;
  const rename = el("button", { type: "button", class: "link small" }, "rename");
  rename.addEventListener("click", () => {
    const input = el("input", { value: key.name, maxlength: 64, "aria-label": "new name" });
    const save = () => attempt(async () => {
      await patch(`/v1/dashboard/keys/${key.prefix}`, { name: input.value });
      await load();
    });
    input.addEventListener("keydown", (e) => e.key === "Enter" && save());
    cell.replaceChildren(input, el("button", { type: "button", onclick: save }, "Save"));
    input.focus();
  });
  cell.append(" ", rename);
  return cell;
}

function actions(key) {
  if (key.revoked) return el("td");
  const toggle = el("button", { type: "button", class: "toggle" }, key.enabled ? "Disable" : "Enable");
  toggle.addEventListener("click", () => attempt(async () => {
    await patch(`/v1/dashboard/keys/${key.prefix}`, { enabled: !key.enabled });
    await load();
  }));
  const revoke = confirmButton("Revoke", "Revoke for good?", () => attempt(async () => {
    await post(`/v1/dashboard/keys/${key.prefix}/revoke`);
    await load();
  }));
  return el("td", { class: "actions" }, toggle, " ", revoke);
}

function row(key) {
  return el(
    "tr",
    { "data-prefix": key.prefix, "data-state": state(key) },
    nameCell(key),
    el("td", {}, el("code", {}, `ls-${key.prefix}_…`)),
    el("td", {}, el("span", { class: `badge ${state(key)}` }, state(key))),
    el("td", {}, key.allowed_models ? key.allowed_models.join(", ") : "all"),
    el("td", {}, time(key.created)),
    el("td", {}, time(key.last_used)),
    actions(key),
  );
}

async function load() {
  const keys = (await get("/v1/dashboard/keys")).data;
  tbody.replaceChildren(...keys.map(row));
  document.getElementById("keys-empty").hidden = keys.length > 0;
}

async function loadModels() {
  const select = document.getElementById("key-models");
  const models = (await get("/v1/dashboard/models")).data;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
}

document.getElementById("new-key").addEventListener("submit", (event) => {
  event.preventDefault();
  attempt(async () => {
    const models = [...document.getElementById("key-models").selectedOptions].map((o) => o.value);
    const body = { name: document.getElementById("key-name").value };
    if (models.length) body.allowed_models = models;
    const created = await post("/v1/dashboard/keys", body);
    document.getElementById("new-key-value").textContent = created.key;
    document.getElementById("new-key-box").hidden = false;
    document.getElementById("key-name").value = "";
    await load();
  });
});

document.getElementById("copy-key").addEventListener("click", (event) =>
  attempt(() => copy(document.getElementById("new-key-value").textContent, event.target)),
);

await attempt(() => Promise.all([load(), loadModels()]));
