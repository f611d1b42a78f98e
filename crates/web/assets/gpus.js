// Live GPU readings on the hub's pages (the home page's server cards, the
// admins' GPU card): every few seconds it asks GET <base>hub/api/gpus and
// rewrites each element marked data-gpu="<device id>" with that GPU's
// utilisation, memory, temperature and power — what the page printed when
// it was made, kept current without a reload.
//
// A file the hub serves (the pages allow script from the hub's own files
// only). What it needs comes from data- attributes of #gpu-live:
//   data-api       the GPU API's URL
//   data-xsrf      the page's XSRF token (a fetch is no navigation, so the
//                  hub asks it for the token, as JupyterHub's pages send it)
//   data-interval  seconds between reads (the sampler's interval)
(function () {
  "use strict";
  var root = document.getElementById("gpu-live");
  if (!root) {
    return;
  }
  var api = root.getAttribute("data-api") || "";
  var xsrf = root.getAttribute("data-xsrf") || "";
  var every = Math.max(1, parseInt(root.getAttribute("data-interval") || "5", 10) || 5) * 1000;
  if (!api) {
    return;
  }
  function text(g, fresh) {
    var parts = [];
    parts.push(fresh && typeof g.utilization_percent === "number" ? g.utilization_percent + " %" : "utilisation unknown");
    if (fresh && typeof g.memory_used_mib === "number") {
      parts.push(typeof g.memory_total_mib === "number" ? g.memory_used_mib + " / " + g.memory_total_mib + " MiB" : g.memory_used_mib + " MiB");
    }
    if (fresh && typeof g.temperature_c === "number") {
      parts.push(g.temperature_c + " °C");
    }
    if (fresh && typeof g.power_w === "number") {
      parts.push(Math.round(g.power_w) + " W");
    }
    return parts.join(" · ");
  }
  function update(view) {
    var fresh = view && view.sampler && view.sampler.state === "ok";
    var byId = {};
    (view.gpus || []).forEach(function (g) {
      byId[g.id] = g;
    });
    var marks = document.querySelectorAll("[data-gpu]");
    for (var i = 0; i < marks.length; i++) {
      var g = byId[marks[i].getAttribute("data-gpu")];
      if (g) {
        marks[i].textContent = text(g, fresh);
      }
    }
    root.setAttribute("data-updated", String(Date.now()));
  }
  function tick() {
    fetch(api, { credentials: "same-origin", headers: { "X-XSRFToken": xsrf, Accept: "application/json" } })
      .then(function (r) {
        return r.ok ? r.json() : null;
      })
      .then(function (v) {
        if (v) {
          update(v);
        }
      })
      .catch(function () {})
      .then(function () {
        window.setTimeout(tick, every);
      });
  }
  window.setTimeout(tick, every);
})();
