// The live parts of the invoice page: the countdown, copy buttons, and the
// status, kept current by polling the public JSON. The server renders every
// state itself, so this script only updates what is already on the page; the
// page works (and pays) without it.
"use strict";

(function () {
  const root = document.getElementById("invoice");
  if (!root) return;

  const FINAL = ["confirmed", "failed"];
  const MAX_BACKOFF_MS = 30000;
  const statusUrl = root.dataset.statusUrl;
  const pollMs = Number(root.dataset.pollMs) || 2000;
  const statusBox = document.getElementById("status");
  const countdown = document.getElementById("countdown");

  let status = root.dataset.status;
  let deadline = null; // performance.now() in ms when the timer ends; null: no timer
  let payments = document.querySelectorAll("#payments-list li").length;
  let refundAddress = root.dataset.refundAddress || null;
  let pollTimer = null;
  let failures = 0;

  function setSecondsLeft(value) {
    const seconds = value === "" || value === null || value === undefined ? null : Number(value);
    deadline = seconds === null || Number.isNaN(seconds) ? null : performance.now() + seconds * 1000;
  }

  function secondsLeft() {
    return deadline === null ? null : Math.max(0, Math.ceil((deadline - performance.now()) / 1000));
  }

  // The same named conditions as receiver/pages/handlers.py `_conditions`.
  function conditions() {
    const left = secondsLeft();
    return {
      timer: left !== null && left > 0,
      timeup: left === 0,
      open: left === null || left > 0,
      payments: payments > 0,
      refund: payments > 0 && !refundAddress,
    };
  }

  function refreshVisibility() {
    const met = conditions();
    document.querySelectorAll("[data-when]").forEach(function (el) {
      const needs = (el.dataset.needs || "").split(" ").filter(Boolean);
      el.hidden = !(el.dataset.when.split(" ").includes(status) && needs.every((n) => met[n]));
    });
  }

  function formatSeconds(total) {
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    const pad = (n) => String(n).padStart(2, "0");
    return h > 0 ? h + ":" + pad(m) + ":" + pad(s) : pad(m) + ":" + pad(s);
  }

  let lastShown = null;
  function tick() {
    const left = secondsLeft();
    if (left === null || !countdown) return;
    const text = formatSeconds(left);
    if (text !== lastShown) {
      countdown.textContent = text;
      lastShown = text;
    }
    if (left === 0) refreshVisibility();
  }

  function safeUrl(value) {
    try {
      const url = new URL(value);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function setLink(id, value) {
    const link = document.getElementById(id);
    if (!link) return;
    const url = value ? safeUrl(value) : null;
    if (url) link.href = url;
    link.hidden = !url;
  }

  function renderPayments(data) {
    const list = document.getElementById("payments-list");
    if (!list) return;
    const currency = data.sender_currency || "";
    list.replaceChildren(
      ...data.transactions.map(function (tx) {
        const item = document.createElement("li");
        const words = list.getAttribute("data-tx-" + tx.status) || tx.status;
        item.textContent = tx.amount + " " + currency + " · " + words;
        return item;
      })
    );
    payments = data.transactions.length;
  }

  function apply(data) {
    // A change the page was not rendered for (a currency confirmed in another
    // tab, a part payment that changes the amount in the QR code): let the
    // server render it.
    const addressAppeared = data.address && !root.dataset.address;
    const partPaid = data.status === "pending" && data.address && data.remaining_amount !== root.dataset.remaining;
    // Prices are back after the exchange rates were too old: show the offers.
    const pricesBack = root.dataset.pricesUnavailable === "1" && !data.prices_unavailable;
    if (addressAppeared || partPaid || pricesBack) {
      window.location.reload();
      return;
    }
    const changed = data.status !== status;
    status = data.status;
    refundAddress = data.refund_address;
    setSecondsLeft(data.status === "pending" ? data.seconds_left : null);
    renderPayments(data);
    if (changed) {
      statusBox.dataset.state = status;
      document.getElementById("status-text").textContent = statusBox.getAttribute("data-heading-" + status) || status;
      const detail = document.getElementById("status-detail");
      detail.textContent = status === "failed" ? data.error_text || "" : statusBox.getAttribute("data-detail-" + status) || "";
      detail.hidden = !detail.textContent;
      root.dataset.status = status;
    }
    setLink("success-link", data.url_success);
    setLink("failed-link", data.url_failed);
    refreshVisibility();
    tick();
  }

  function schedule(delay) {
    if (pollTimer === null && !FINAL.includes(status)) pollTimer = window.setTimeout(poll, delay);
  }

  async function poll() {
    pollTimer = null;
    if (document.hidden) return; // resumed on visibilitychange
    let delay = pollMs;
    try {
      const response = await fetch(statusUrl, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
      if (response.status === 429) {
        delay = Math.max(pollMs, (Number(response.headers.get("Retry-After")) || 5) * 1000);
      } else if (response.status === 404) {
        return;
      } else if (!response.ok) {
        throw new Error("status " + response.status);
      } else {
        failures = 0;
        apply((await response.json()).data);
      }
    } catch (e) {
      failures += 1;
      delay = Math.min(MAX_BACKOFF_MS, pollMs * 2 ** failures);
    }
    schedule(delay);
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && pollTimer === null) poll();
  });

  // ---- copy buttons (hidden without JavaScript: copying needs it) ----------
  const copyStatus = document.getElementById("copy-status");
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    const label = button.textContent;
    button.hidden = false;
    button.addEventListener("click", async function () {
      try {
        await navigator.clipboard.writeText(button.dataset.copy);
      } catch (e) {
        // No clipboard access (an old browser, an insecure origin): select the
        // text so the customer can copy it by hand.
        const target = button.parentElement.querySelector("code, span, p");
        if (target) window.getSelection().selectAllChildren(target);
        return;
      }
      button.textContent = "Copied";
      if (copyStatus) copyStatus.textContent = (button.getAttribute("aria-label") || "Copy").replace("Copy", "Copied");
      window.setTimeout(function () {
        button.textContent = label;
      }, 2000);
    });
  });

  // ---- forms: one submission only ------------------------------------------
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function () {
      form.querySelectorAll("button[type=submit]").forEach((b) => (b.disabled = true));
    });
  });

  const noLiveUpdates = document.getElementById("no-live-updates");
  if (noLiveUpdates) noLiveUpdates.hidden = true;

  setSecondsLeft(status === "pending" ? root.dataset.secondsLeft : null);
  window.setInterval(tick, 250);
  tick();
  schedule(pollMs);
})();
