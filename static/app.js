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

// "Will this happen to me?": N requests at once to the naive global-variable counter and to Tally's,
// then, for each, the numbers handed out, how many were handed out twice and how many were skipped,
// drawn as one bar per number (red: handed out more than once).
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("race-form");
  if (!form || !window.fetch) return;
  const SVG = "http://www.w3.org/2000/svg";

  async function race(url, n) {
    const one = async () => {
      try {
        const response = await fetch(url, { method: "POST", headers: { Accept: "application/json" } });
        if (!response.ok) return null;
        const body = await response.json();
        return Number.isInteger(body.value) ? body.value : null;
      } catch (error) {
        return null;
      }
    };
    return Promise.all(Array.from({ length: n }, one));
  }

  function show(side, values) {
    const got = values.filter((v) => v !== null);
    const times = new Map();
    for (const v of got) times.set(v, (times.get(v) || 0) + 1);
    const numbers = [...times.keys()].sort((a, b) => a - b);
    const duplicates = got.length - numbers.length;
    const gaps = numbers.length ? numbers[numbers.length - 1] - numbers[0] + 1 - numbers.length : 0;
    const failed = values.length - got.length;
    const svg = side.querySelector("svg");
    svg.replaceChildren();
    const most = Math.max(1, ...times.values());
    const width = 200 / Math.max(1, numbers.length);
    numbers.forEach((number, index) => {
      const count = times.get(number);
      const bar = document.createElementNS(SVG, "rect");
      const height = (58 * count) / most;
      bar.setAttribute("x", String(index * width));
      bar.setAttribute("y", String(60 - height));
      bar.setAttribute("width", String(Math.max(width - 0.3, 0.3)));
      bar.setAttribute("height", String(height));
      bar.setAttribute("class", count > 1 ? "bar twice" : "bar");
      svg.appendChild(bar);
    });
    const result = side.querySelector("[data-result]");
    result.textContent =
      `${got.length} answers, ${numbers.length} distinct numbers, ` +
      `${duplicates} handed out twice, ${gaps} skipped` + (failed ? `, ${failed} failed` : "");
    result.dataset.duplicates = String(duplicates);
    result.dataset.answers = String(got.length);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("race-n");
    const n = Math.min(Math.max(parseInt(input.value, 10) || 100, 10), parseInt(input.max, 10));
    input.value = String(n);
    const button = document.getElementById("race-run");
    button.disabled = true;
    const [naive, tally] = await Promise.all([race("/race/naive/incr", n), race("/race/tally/incr", n)]);
    show(document.getElementById("race-naive"), naive);
    show(document.getElementById("race-tally"), tally);
    form.dataset.done = String((parseInt(form.dataset.done || "0", 10) || 0) + 1);
    button.disabled = false;
  });
});
