// Keeps each [data-live] panel current by fetching its HTML again every few seconds.
// No inline script anywhere: the page's Content-Security-Policy forbids it.
(function () {
  "use strict";
  var EVERY_MS = 2000;
  var status = null;

  function say(text, bad) {
    if (!status) { return; }
    status.textContent = text;
    status.classList.toggle("stale", !!bad);
  }

  function busy(panel) {  // never replace a panel while the user is typing in it
    var a = document.activeElement;
    return a && panel.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName);
  }

  function refresh(panel) {
    if (busy(panel)) { return Promise.resolve(); }
    return fetch(panel.getAttribute("data-live"), {credentials: "same-origin", cache: "no-store",
                                                   headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search)); throw new Error("logged out"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === panel.getAttribute("data-html")) { return; }
        var open = {};
        panel.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
        panel.innerHTML = html;
        panel.setAttribute("data-html", html);
        panel.querySelectorAll("details[id]").forEach(function (d) { if (open[d.id]) { d.open = true; } });
      });
  }

  function tick() {
    if (document.hidden) { return; }
    var panels = document.querySelectorAll("[data-live]");
    Promise.all(Array.prototype.map.call(panels, refresh)).then(function () {
      say("updated " + new Date().toLocaleTimeString("en-IN", {timeZone: "Asia/Kolkata", hour12: false}) + " IST", false);
    }, function (e) {
      say("not updating: " + e.message, true);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    status = document.getElementById("live-status");
    if (!document.querySelector("[data-live]")) { return; }
    setInterval(tick, EVERY_MS);
    document.addEventListener("visibilitychange", tick);
  });
})();
