// Cloister console: the only script (CSP forbids inline ones). It refreshes
// pages that ask for it and gives the labeling queue keyboard shortcuts.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const refresh = document.querySelector("[data-refresh]");
  if (refresh) {
    const seconds = Number(refresh.getAttribute("data-refresh")) || 3;
    setTimeout(() => window.location.reload(), seconds * 1000);
  }
  const form = document.getElementById("label-form");
  if (form) {
    document.addEventListener("keydown", (event) => {
      if (event.ctrlKey || event.metaKey || event.altKey) return;
      // Typing into a control (the answers' "change to" lists) is not a shortcut.
      if (event.target instanceof Element && event.target.closest("select, input, textarea")) return;
      const button = form.querySelector(`button[data-key="${event.key}"]`);
      if (button) {
        event.preventDefault();
        button.click();
      }
    });
  }
});
