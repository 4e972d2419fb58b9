// Loaded first: every script error, rejected promise, console.error and content-security-policy
// violation on the page is kept in window.dashboardErrors, which the browser test reads (and a
// person can read in the console).
window.dashboardErrors = [];
window.addEventListener("error", (e) => window.dashboardErrors.push("error: " + (e.message || e.type)));
window.addEventListener("unhandledrejection", (e) => window.dashboardErrors.push("rejection: " + e.reason));
document.addEventListener("securitypolicyviolation", (e) =>
  window.dashboardErrors.push("csp: " + e.violatedDirective + " " + e.blockedURI));
(function () {
  const original = console.error;
  console.error = function (...args) {
    window.dashboardErrors.push("console: " + args.join(" "));
    original.apply(console, args);
  };
})();
