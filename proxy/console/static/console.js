// Warden console: progressive enhancement only (every page works without it).
// - countdowns: "time left" on held approvals ticks every second;
// - the inbox polls /console/approvals/state and marks approvals that were
//   decided elsewhere (their forms are disabled; the server refuses them anyway).
"use strict";
(function () {
  function fmt(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s >= 3600) { return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min"; }
    if (s >= 60) { return Math.floor(s / 60) + " min " + (s % 60) + " s"; }
    return s + " s";
  }
  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll(".countdown[data-expires]").forEach(function (el) {
      var left = parseFloat(el.getAttribute("data-expires")) - now;
      el.textContent = left > 0 ? fmt(left) : "expired";
    });
  }
  function poll(live) {
    var url = live.getAttribute("data-poll");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" }, redirect: "manual" })
      .then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401) { throw new Error("signed out"); }
        return r.json();
      })
      .then(function (state) {
        var pending = new Set(state.pending);
        var shown = new Set();
        document.querySelectorAll("[data-approval]").forEach(function (card) {
          var id = card.getAttribute("data-approval");
          shown.add(id);
          if (!pending.has(id) && !card.classList.contains("is-stale")) {
            card.classList.add("is-stale");
            card.querySelectorAll("button, input").forEach(function (b) { b.disabled = true; });
            var note = card.querySelector(".stale");
            if (note) { note.hidden = false; }
          }
        });
        var added = state.pending.filter(function (id) { return !shown.has(id); }).length;
        live.textContent = state.pending.length + " pending" + (added ? " (" + added + " new: reload to see them)" : "") + ".";
      })
      .catch(function () { live.textContent = "Live updates stopped: your session may have ended. Reload the page."; clearInterval(timer); });
  }
  var timer = 0;
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
    var live = document.querySelector("[data-poll]");
    if (live) { timer = setInterval(function () { poll(live); }, 2000); }
  });
})();
