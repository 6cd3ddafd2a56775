// koban dashboard: live refresh of each page's live region, confirmations, bulk selection.
// Fragments come from the server already escaped; nothing here builds markup from job data.
(function () {
  "use strict";

  var live = document.querySelector("[data-live]");
  var status = document.getElementById("live-status");
  var period = Number(document.body.getAttribute("data-refresh")) || 2000;
  var busy = false;

  function checkedIds() {
    var boxes = document.querySelectorAll('input[name="ids"][form="bulk"]:checked');
    return Array.prototype.map.call(boxes, function (box) { return box.value; });
  }

  function updateSelected() {
    var label = document.querySelector("[data-selected-count]");
    if (label) { label.textContent = checkedIds().length + " selected"; }
  }

  function partialUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    return url.toString();
  }

  function editingInside(element) {
    var active = document.activeElement;
    return active && element.contains(active) &&
      (active.tagName === "INPUT" || active.tagName === "SELECT" || active.tagName === "TEXTAREA");
  }

  function refresh() {
    if (!live || busy || document.visibilityState === "hidden" || editingInside(live)) { return; }
    busy = true;
    fetch(partialUrl(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (html === null || editingInside(live)) { return; }
        var keep = checkedIds();
        var openDetails = Array.prototype.map.call(
          live.querySelectorAll("details[open]"), function (d, i) { return i; });
        live.innerHTML = html;
        keep.forEach(function (id) {
          var box = live.querySelector('input[name="ids"][value="' + CSS.escape(id) + '"]');
          if (box) { box.checked = true; }
        });
        var details = live.querySelectorAll("details");
        openDetails.forEach(function (i) { if (details[i]) { details[i].open = true; } });
        updateSelected();
        if (status) { status.textContent = "Live · updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (error) {
        if (status) { status.textContent = "Live updates paused: " + error.message; }
      })
      .finally(function () { busy = false; });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var button = event.submitter;
    var message = (button && button.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    if (form.hasAttribute("data-bulk")) {
      var n = checkedIds().length;
      if (n === 0) {
        event.preventDefault();
        window.alert("Select at least one job first.");
        return;
      }
      message = message && message.replace("{n}", String(n));
    }
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });

  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.hasAttribute && target.hasAttribute("data-select-all")) {
      document.querySelectorAll('input[name="ids"][form="bulk"]').forEach(function (box) {
        box.checked = target.checked;
      });
    }
    updateSelected();
  });

  if (live) {
    window.setInterval(refresh, period);
    if (status) { status.textContent = "Live"; }
  }
})();
