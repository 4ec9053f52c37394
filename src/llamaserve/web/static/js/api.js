// Calls to the dashboard's JSON APIs, with the session cookie and the CSRF token; small DOM helpers.
// Text from the server is only ever set as textContent, never as HTML.

let csrfToken = null;

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  if (data && typeof data.csrf_token === "string") csrfToken = data.csrf_token;
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});
export const patch = (path, body) => call("PATCH", path, body);

export async function session() {
  return get("/auth/session");
}

/** The logged-in session, or a redirect to the log-in page. Fills in the header (who, admin link, log out). */
export async function requireLogin() {
  const s = await session();
  if (!s.authenticated) {
    location.replace(`/login?next=${encodeURIComponent(location.pathname)}`);
    return new Promise(() => {});  // the page is going away: nothing after this runs
  }
  document.getElementById("who").textContent = s.email || s.account;
  document.getElementById("nav-admin").hidden = !s.is_admin;
  const page = document.body.dataset.page;
  document.querySelector(`[data-nav="${page}"]`)?.classList.add("active");
  document.getElementById("logout").addEventListener("click", async () => {
    await post("/auth/logout").catch(() => {});
    location.replace("/login");
  });
  return s;
}

export function flash(message, kind = "error") {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

/** Runs an action, showing its error (if any) in the flash box. */
export async function attempt(action) {
  try {
    flash("");
    return await action();
  } catch (e) {
    flash(e.message);
    return undefined;
  }
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child != null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function time(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "never";
}

export function number(n) {
  return Number(n).toLocaleString();
}

export async function copy(text, button) {
  await navigator.clipboard.writeText(text);
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = label), 1500);
}
