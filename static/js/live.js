// Live pages: the websocket pushes out-of-band fragments (cards, the header badge, the extraction
// box of the modal) to every page that is connected. A page applies only what it shows: a
// fragment whose target is not on this page goes into the list its `data-live-list` names when
// the page has that list (a card created elsewhere, or pushed before the answer that adds it),
// and is skipped otherwise (a model card on the Datasets page). htmx would log an
// oobErrorNoTarget for each skipped one.
htmx.defineExtension("live", {
  transformResponse(text, xhr) {
    if (xhr) return text; // an HTTP answer: its own targets are the page's
    const template = document.createElement("template");
    template.innerHTML = text;
    const kept = [];
    for (const el of Array.from(template.content.children)) {
      const spec = el.getAttribute("hx-swap-oob") || "true";
      const colon = spec.indexOf(":");
      const selector = colon > 0 ? spec.slice(colon + 1) : `#${CSS.escape(el.id)}`;
      if (document.querySelector(selector)) {
        kept.push(el.outerHTML);
        continue;
      }
      const list = el.dataset.liveList;
      if (spec === "true" && list && document.querySelector(list)) {
        el.removeAttribute("hx-swap-oob");
        kept.push(`<div hx-swap-oob="afterbegin:${list}">${el.outerHTML}</div>`);
      }
    }
    return kept.join("");
  },
});

// What the server sends while a socket is down (the page is loading, the connection dropped, the
// server restarted) is lost; so on each open the page asks once for a resync: the cards of
// every row changed since it last heard the server, and the cards it shows (one whose row is
// gone is deleted). See CardConsumer.receive.
const liveSince = new WeakMap(); // socket element -> ms when it last heard the server
const pageStart = Date.now() - performance.now(); // the page's content is as old as its request
document.addEventListener("htmx:wsClose", (e) => {
  if (!liveSince.has(e.target)) liveSince.set(e.target, Date.now());
});
document.addEventListener("htmx:wsOpen", (e) => {
  const socketElt = e.target;
  const since = liveSince.has(socketElt) ? liveSince.get(socketElt) : pageStart;
  liveSince.delete(socketElt);
  const ids = Array.from(socketElt.querySelectorAll("[data-live-card]"))
    .filter((el) => el.closest("[ws-connect]") === socketElt)
    .map((el) => el.dataset.liveCard);
  const gap_s = Math.max(0, (Date.now() - since) / 1000);
  e.detail.socketWrapper.send(JSON.stringify({ resync: { gap_s, ids } }), socketElt);
});

// htmx's ws extension reconnects only after an abnormal close (1006, 1011, 1012, 1013); a server
// that closes cleanly (1000, or 1001 "going away": a restart, a proxy's idle timeout) would leave
// the page disconnected for good. Reconnect after any other close too, with a capped backoff,
// while the socket's element is on the page (the extension closes it when the element goes).
const EXTENSION_RECONNECTS = [1006, 1011, 1012, 1013];
const closesInARow = new WeakMap(); // socket element -> closes since it last opened
document.addEventListener("htmx:wsOpen", (e) => closesInARow.delete(e.target));
document.addEventListener("htmx:wsClose", (e) => {
  const socketElt = e.target;
  if (EXTENSION_RECONNECTS.includes(e.detail.event.code) || !socketElt.isConnected) return;
  const n = closesInARow.get(socketElt) || 0;
  closesInARow.set(socketElt, n + 1);
  const delay = Math.min(500 * 2 ** n, 30000) * (0.5 + Math.random() / 2);
  setTimeout(() => socketElt.isConnected && e.detail.socketWrapper.reconnect(), delay);
});
