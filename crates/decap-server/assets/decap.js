// Decap's web UI: live console, live pages, confirmations, relative times.
// Text from builds is only ever put in the page as text (textContent), never
// as HTML.
(function () {
  "use strict";
  var SYMBOLS = { queued: "○", deferred: "◷", running: "▶", succeeded: "✓", failed: "✗",
    errored: "!", timed_out: "⧖", cancelled: "⊘" };
  var streams = [];

  function closeStreams() {
    streams.forEach(function (s) { s.close(); });
    streams = [];
  }

  // ANSI colours (SGR) to spans; everything else stays text.
  var ANSI = /\x1b\[([0-9;]*)m/g;
  function appendAnsi(parent, line, state) {
    var last = 0, m;
    ANSI.lastIndex = 0;
    while ((m = ANSI.exec(line)) !== null) {
      addText(parent, line.slice(last, m.index), state);
      (m[1] || "0").split(";").forEach(function (code) {
        var n = parseInt(code || "0", 10);
        if (n === 0) { state.fg = null; state.bold = false; }
        else if (n === 1) { state.bold = true; }
        else if (n === 22) { state.bold = false; }
        else if (n === 39) { state.fg = null; }
        else if ((n >= 30 && n <= 37) || (n >= 90 && n <= 97)) { state.fg = n; }
      });
      last = ANSI.lastIndex;
    }
    addText(parent, line.slice(last).replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ""), state);
    parent.appendChild(document.createTextNode("\n"));
  }
  function addText(parent, text, state) {
    if (!text) { return; }
    if (state.fg === null && !state.bold) {
      parent.appendChild(document.createTextNode(text));
      return;
    }
    var span = document.createElement("span");
    if (state.fg !== null) { span.className = "a" + state.fg; }
    if (state.bold) { span.className += " ab"; }
    span.textContent = text;
    parent.appendChild(span);
  }

  function showStatus(view) {
    var p = document.getElementById("build-status");
    if (!p || !view || !view.status) { return; }
    p.textContent = "";
    var s = document.createElement("span");
    s.className = "status s-" + view.status;
    var sym = document.createElement("span");
    sym.setAttribute("aria-hidden", "true");
    sym.textContent = SYMBOLS[view.status] || "";
    s.appendChild(sym);
    s.appendChild(document.createTextNode(" " + view.status));
    p.appendChild(s);
    if (view.message) {
      var msg = document.createElement("span");
      msg.className = "message";
      msg.textContent = " " + view.message;
      p.appendChild(msg);
    }
  }

  // A preset build's phases are sections of its console, between
  // "── phase NAME ──" and "── phase NAME: OUTCOME ──": each is folded into
  // a <details>, open while it runs and when it failed.
  var SECTION_START = /^── phase (machine|setup|test) ──$/;
  var SECTION_END = /^── phase (machine|setup|test): (.*) ──$/;
  function appendLine(pre, line, state) {
    var m = SECTION_START.exec(line);
    if (m && !state.section) {
      var d = document.createElement("details");
      d.className = "section";
      d.open = true;
      var s = document.createElement("summary");
      s.textContent = line;
      d.appendChild(s);
      var body = document.createElement("div");
      d.appendChild(body);
      pre.appendChild(d);
      state.section = d;
      state.sectionBody = body;
      state.sectionName = m[1];
      return;
    }
    var e = SECTION_END.exec(line);
    if (e && state.section && e[1] === state.sectionName) {
      var d2 = state.section;
      d2.firstChild.textContent = line;
      var failed = e[2].indexOf("passed") !== 0;
      if (failed) { d2.className += " failed"; } else { d2.open = false; }
      state.section = null;
      return;
    }
    appendAnsi(state.section ? state.sectionBody : pre, line, state);
  }

  function followConsole(pre) {
    var id = pre.getAttribute("data-build");
    var wasFinal = pre.getAttribute("data-final") === "true";
    var state = { fg: null, bold: false, section: null, sectionBody: null, sectionName: "" };
    pre.textContent = ""; // a fresh stream starts from the first byte
    var label = document.getElementById("console-state");
    var es = new EventSource("/api/v1/logs/" + encodeURIComponent(id) + "/events");
    streams.push(es);
    es.addEventListener("log", function (e) {
      var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      appendLine(pre, e.data, state);
      if (atBottom) { pre.scrollTop = pre.scrollHeight; }
    });
    es.addEventListener("status", function (e) {
      try { showStatus(JSON.parse(e.data)); } catch (_) { /* not JSON: ignore */ }
    });
    es.addEventListener("error", function (e) {
      if (e.data) {
        // The server's own error event (e.g. the log is gone): final.
        var note = document.createElement("p");
        note.className = "problem";
        note.textContent = e.data;
        pre.parentNode.insertBefore(note, pre);
        pre.hidden = true;
        es.close();
      } else if (label) {
        label.textContent = "reconnecting…";
      }
    });
    es.addEventListener("open", function () {
      if (label && !wasFinal) { label.textContent = "live"; }
    });
    es.addEventListener("end", function () {
      es.close();
      if (label) { label.textContent = wasFinal ? "stored log" : "finished"; }
      pre.setAttribute("data-done", "true");
      if (!wasFinal) {
        // Show the final facts, the phases and the artifacts once the build
        // has ended (its environment may take a moment after its log).
        var tries = 0;
        var untilEnded = function () {
          refresh("#build-head", function () {
            refreshTimes();
            var st = document.querySelector("#build-status .status");
            var ended = st && !/s-(running|queued|deferred)/.test(st.className);
            if (ended || ++tries >= 30) {
              refresh("#phases");
              refresh("#artifacts");
            } else {
              setTimeout(untilEnded, 1000);
            }
          });
        };
        setTimeout(untilEnded, 300);
      }
    });
  }

  function refresh(selector, then) {
    if (window.htmx) {
      window.htmx.ajax("GET", window.location.pathname + window.location.search,
        { target: selector, select: selector, swap: "outerHTML" })
        .then(then || refreshTimes);
    } else {
      window.location.reload();
    }
  }

  function followPage(el) {
    var pending = null;
    var es = new EventSource(el.getAttribute("data-live"));
    streams.push(es);
    es.addEventListener("build", function () {
      if (pending) { return; }
      pending = setTimeout(function () { pending = null; refresh("#" + el.id); }, 400);
    });
  }

  function relative(iso) {
    var secs = Math.round((Date.now() - Date.parse(iso)) / 1000);
    if (isNaN(secs)) { return null; }
    if (secs < -3600) { return "in " + Math.floor(-secs / 3600) + " h"; }
    if (secs < -60) { return "in " + Math.floor(-secs / 60) + " min"; }
    if (secs < -5) { return "in " + -secs + " s"; }
    if (secs < 5) { return "just now"; }
    if (secs < 60) { return secs + " s ago"; }
    if (secs < 3600) { return Math.floor(secs / 60) + " min ago"; }
    if (secs < 86400) { return Math.floor(secs / 3600) + " h ago"; }
    return Math.floor(secs / 86400) + " d ago";
  }
  function refreshTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      var r = relative(t.getAttribute("datetime"));
      if (r) { t.textContent = r; }
    });
  }

  // How long, as the server writes it (ui::duration_text).
  function durationText(ms) {
    var s = Math.floor(ms / 1000);
    if (ms < 1000) { return ms + " ms"; }
    if (s < 60) { return s + "." + Math.floor((ms % 1000) / 100) + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min " + (s % 60) + " s"; }
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  // A running build's time counts up on its page.
  function tickDurations() {
    document.querySelectorAll("[data-since]").forEach(function (el) {
      var since = Date.parse(el.getAttribute("data-since"));
      if (!isNaN(since)) { el.textContent = durationText(Math.max(0, Date.now() - since)); }
    });
  }

  function init() {
    closeStreams();
    var pre = document.getElementById("console");
    if (pre) { followConsole(pre); }
    var live = document.querySelector("[data-live]");
    if (live && live.id) { followPage(live); }
    refreshTimes();
  }

  // Destructive actions ask first, with or without htmx.
  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute && e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) {
      e.preventDefault();
      e.stopPropagation();
    }
  }, true);

  document.addEventListener("DOMContentLoaded", init);
  document.addEventListener("htmx:historyRestore", init);
  document.addEventListener("htmx:afterSettle", function (e) {
    // A whole page came in (boosted navigation or a refresh of the body).
    if (e.target === document.body || (e.detail && e.detail.boosted)) { init(); }
  });
  window.addEventListener("pagehide", closeStreams);
  setInterval(refreshTimes, 30000);
  setInterval(tickDurations, 1000);
}());
