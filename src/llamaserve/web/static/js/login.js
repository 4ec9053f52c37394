import { attempt, post, session } from "./api.js";

const form = document.getElementById("auth-form");
const mode = form.dataset.mode;

function next() {
  // Only paths on this site: never an open redirect.
  const target = new URLSearchParams(location.search).get("next") || "/";
  return target.startsWith("/") && !target.startsWith("//") ? target : "/";
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
