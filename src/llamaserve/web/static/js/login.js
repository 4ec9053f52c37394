import { attempt, post, session } from "./api.js";

const form = document.getElementById("auth-form");
const mode = form.dataset.mode;

function next() {
  // Only pages of this site: never an open redirect. Resolved as the browser will resolve it, so that "/\host"
  // (which browsers read as "//host") goes nowhere else either.
  const target = new URL(new URLSearchParams(location.search).get("next") || "/", location.origin);
  return target.origin === location.origin ? target.pathname + target.search + target.hash : "/";
}

const current = await session();  // also sets the pre-login CSRF cookie and token
if (current.authenticated) location.replace(next());

form.addEventListener("submit", (event) => {
  event.preventDefault();
  attempt(async () => {
    const body = {
      email: document.getElementById("email").value,
      password: document.getElementById("password").value,
    };
    await post(mode === "signup" ? "/auth/signup" : "/auth/login", body);
    const after = await session();
    if (!after.authenticated) {
      throw new Error("The browser refused the session cookie: open the dashboard over HTTPS (or on localhost).");
    }
    location.replace(next());
  });
});
