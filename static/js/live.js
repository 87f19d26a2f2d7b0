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
