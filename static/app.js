// Progressive enhancement: without JavaScript the buttons post the form and the page reloads;
// with it they call the JSON API and update this browser's counter in place.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form.buttons");
  const mine = document.getElementById("mine");
  const status = document.getElementById("status");
  if (!form || !mine || !window.fetch) return;
  form.addEventListener("click", async (event) => {
    const button = event.target.closest("button[name=action]");
    if (!button) return;
    event.preventDefault();
    const action = button.value; // the form's inc / dec / reset
    const step = { inc: "/incr", dec: "/decr", reset: "" }[action];
    const url = "/api/me/counters/counter" + step;
    try {
      const response = await fetch(url, {
        method: action === "reset" ? "DELETE" : "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.detail || response.statusText);
      mine.textContent = body.value;
      status.textContent = "";
    } catch (error) {
      status.textContent = "Could not update the counter: " + error.message;
    }
  });
});
