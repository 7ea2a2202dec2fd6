// The console's live parts (no inline script: the Content-Security-Policy forbids it).
// Fragments come rendered (and escaped) by the server's templates; they replace the
// elements of the same id.
(function () {
  "use strict";

  function replace(id, html) {
    var el = document.getElementById(id);
    if (!el) return null;
    var t = document.createElement("template");
    t.innerHTML = html;
    var fresh = t.content.firstElementChild;
    if (!fresh) return null;
    el.replaceWith(fresh);
    return fresh;
  }

  // A deployment's page: server-sent events, one per live part that changed.
  function stream() {
    var live = document.getElementById("live");
    if (!live || !live.dataset.stream || !window.EventSource) return;
    var es = new EventSource(live.dataset.stream);
    ["status", "statistics", "phases", "deployment-devices"].forEach(function (name) {
      es.addEventListener(name, function (e) { replace(name, e.data); });
    });
    es.addEventListener("done", function () { es.close(); });
    window.addEventListener("pagehide", function () { es.close(); });
  }

  // Fetch a fragment every `every` ms, at most `tries` times, until `done(el)`.
  function poll(id, attr, every, tries, done) {
    var el = document.getElementById(id);
    if (!el || !el.dataset[attr] || done(el)) return;
    var url = el.dataset[attr];
    var left = tries;
    var timer = window.setInterval(function () {
      if (left-- <= 0) { window.clearInterval(timer); return; }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) return;
          var current = document.getElementById(id);
          if (current && current.outerHTML !== html.trim()) {
            var fresh = replace(id, html);
            if (fresh && done(fresh)) window.clearInterval(timer);
          }
        })
        .catch(function () { /* the next tick tries again */ });
    }, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    stream();
    poll("command-response", "poll", 1000, 120, function (el) { return el.dataset.done === "1"; });
    poll("timeline", "refresh", 3000, 400, function () { return false; });
  });
})();
