// The spawn-pending page (GET <base>hub/spawn-pending/<user>[/<server>]):
// follows the server's progress stream, moves the bar, lists the messages
// and goes to the server once it is ready.
//
// A file the hub serves, not an inline script: the hub's pages allow script
// from the hub's own files only (Content-Security-Policy script-src 'self').
// What it needs comes from data- attributes of #spawn-progress:
//   data-progress-url  the progress event stream (JupyterHub's API)
//   data-server-url    where the server is reached, when the event names none
//   data-next-url      (optional) the page on that server to land on instead
//   data-xsrf          the page's XSRF token: an EventSource is not a
//                      navigation, so the hub asks it for the token (?_xsrf=)
(function () {
  "use strict";
  var root = document.getElementById("spawn-progress");
  if (!root) {
    return;
  }
  var bar = document.getElementById("bar");
  var msg = document.getElementById("message");
  var log = document.getElementById("log");
  var src = root.getAttribute("data-progress-url") || "";
  var serverUrl = root.getAttribute("data-server-url") || "";
  var nextUrl = root.getAttribute("data-next-url") || "";
  var xsrf = root.getAttribute("data-xsrf") || "";
  if (!src) {
    return;
  }
  if (xsrf) {
    src += (src.indexOf("?") < 0 ? "?" : "&") + "_xsrf=" + encodeURIComponent(xsrf);
  }
  var done = false;
  var es = new EventSource(src);
  es.onmessage = function (e) {
    var ev;
    try {
      ev = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    if (typeof ev.progress === "number") {
      var pct = Math.max(0, Math.min(100, ev.progress));
      bar.style.width = pct + "%";
      root.setAttribute("data-progress", String(pct));
    }
    msg.textContent = ev.message || "";
    var li = document.createElement("li");
    li.textContent = ev.message || "";
    log.appendChild(li);
    if (ev.ready) {
      done = true;
      es.close();
      root.setAttribute("data-state", "ready");
      window.location.href = nextUrl || ev.url || serverUrl;
    } else if (ev.failed) {
      done = true;
      es.close();
      root.setAttribute("data-state", "failed");
      bar.classList.add("failed");
    }
  };
  es.onerror = function () {
    if (!done) {
      msg.textContent = "Lost the connection to the progress stream; reload to retry.";
    }
  };
})();
