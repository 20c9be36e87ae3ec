// minirlhf label: the page. Plain DOM, no libraries. Model outputs and prompts are
// untrusted: they only ever reach the page through textContent, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  // The session id (this browser's annotator id) lives in a cookie: cookies ignore the port, so a
  // browser that comes back to a server restarted on another port keeps its session and its undo
  // history (localStorage, where older pages kept it, is per origin: per port).
  const SESSION_COOKIE = "minirlhf_label_session";
  const SESSION_KEY = "minirlhf-label-session";
  const ROLE_NAMES = {system: "System", user: "User", assistant: "Assistant"};
  let view = null;     // the server's last answer: {session, mode, item, progress, can_undo, result?}
  let picked = [];     // display positions, best first
  let tied = [];       // tied[i]: picked[i] is as good as picked[i - 1] (tied[0] unused)
  let current = null;  // the display position `=` ties: the last one picked (not the one placed by itself)
  let busy = false;    // a request is in flight: ignore input until it lands
  let drag = null;

  // ---- server ----

  function getSession() {
    for (const part of document.cookie.split(";")) {
      const [name, value] = part.trim().split("=");
      if (name === SESSION_COOKIE && value) return value;
    }
    return localStorage.getItem(SESSION_KEY);
  }

  function setSession(session) {
    const age = session ? 365 * 24 * 3600 : 0;
    document.cookie = `${SESSION_COOKIE}=${session || ""}; Path=/; Max-Age=${age}; SameSite=Strict`;
    localStorage.removeItem(SESSION_KEY);
  }

  async function api(path, body) {
    const session = getSession();
    const r = await fetch(path, {
      method: "POST", headers: {"Content-Type": "application/json"}, credentials: "same-origin",
      body: JSON.stringify(session ? {session, ...body} : body),
    });
    let data = null;
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok) throw new Error((data && data.error) || `HTTP ${r.status}`);
    return data;
  }

  async function call(path, body, message) {
    if (busy) return;
    busy = true;
    document.body.classList.add("busy");
    try {
      show(await api(path, body));
      status(message || "");
    } catch (e) {
      status(e.message, true);
      try {  // the server restarted, or the prompt went elsewhere: show where things stand now
        if (path === "/api/next") setSession(null);
        show(await api("/api/next", {}));
      } catch (e2) { /* keep the error shown */ }
    } finally {
      busy = false;
      document.body.classList.remove("busy");
    }
  }

  function status(text, error) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!error);
  }

  // ---- actions ----

  const k = () => view.item.responses.length;

  function insertAt(j, pos) {
    const from = picked.indexOf(pos);
    if (from >= 0) removeAt(from);
    picked.splice(j, 0, pos);
    tied.splice(j, 0, false);
    if (j + 1 < picked.length) tied[j + 1] = false;
    tied[0] = false;
  }

  function removeAt(j) {
    picked.splice(j, 1);
    tied.splice(j, 1);
    if (j < picked.length) tied[j] = false;
    if (picked.length) tied[0] = false;
  }

  function autoComplete() {  // the last response left has only one place to go
    if (picked.length === k() - 1) {
      for (let p = 0; p < k(); p++) if (!picked.includes(p)) insertAt(picked.length, p);
    }
  }

  // a number picks that response as the next best; the number of one already ranked makes it
  // the one `=` ties (so the last response, placed by itself, can be tied too)
  function pick(pos) {
    if (pos >= k()) return;
    if (!picked.includes(pos)) {
      insertAt(picked.length, pos);
      autoComplete();
    }
    current = pos;
    render();
  }

  function takeBack() {
    if (picked.length) removeAt(picked.length - 1);
    if (!picked.includes(current)) current = null;
    render();
  }

  function toggleTie(i) {
    if (i < 1 || i >= picked.length) return;
    tied[i] = !tied[i];
    render();
  }

  // `=`: tie the current response with the one above it (the best one: with the one below);
  // without a current one, the last in the ranking
  function tieCurrent() {
    const i = picked.includes(current) ? picked.indexOf(current) : picked.length - 1;
    toggleTie(i === 0 ? 1 : i);
  }

  function submit() {
    if (picked.length !== k()) {
      status(`Rank all ${k()} responses first (${picked.length} ranked).`, true);
      return;
    }
    call("/api/judge", {item: view.item.id, ranking: picked.slice(), ties: tied.slice(1)}, "Saved.");
  }

  function judgeCompare(choice) {
    const body = {item: view.item.id, ranking: choice === "right" ? [1, 0] : [0, 1], ties: [choice === "tie"]};
    call("/api/judge", body, "Saved.");
  }

  function skip() { call("/api/skip", {item: view.item.id}, "Skipped."); }

  function undo() {
    if (view && view.can_undo) call("/api/undo", {}, "Undone: this prompt is back, judge it again.");
  }

  // ---- drag (pointer events: mouse, pen and touch alike) ----

  function startDrag(e) {
    if (busy || e.button !== 0 || e.target.closest("button")) return;
    const li = e.currentTarget;
    drag = {pos: Number(li.dataset.pos), li, x0: e.clientX, y0: e.clientY, moved: false};
    li.setPointerCapture(e.pointerId);
    li.addEventListener("pointermove", moveDrag);
    li.addEventListener("pointerup", endDrag);
    li.addEventListener("pointercancel", endDrag);
    e.preventDefault();
  }

  function dropTarget(x, y) {
    const inside = (el) => {
      const r = el.getBoundingClientRect();
      return x >= r.left && x <= r.right && y >= r.top && y <= r.bottom;
    };
    if (inside($("ranking-zone"))) {
      const cards = [...$("ranking").children].filter((c) => c !== drag.li);
      let index = cards.findIndex((c) => { const r = c.getBoundingClientRect(); return y < r.top + r.height / 2; });
      if (index < 0) index = cards.length;
      return {zone: "ranking", index, before: cards[index] || null};
    }
    if (inside($("pool-zone"))) return {zone: "pool"};
    return null;
  }

  function clearMarks() {
    for (const el of document.querySelectorAll(".drop-before, .drop-end, .over")) {
      el.classList.remove("drop-before", "drop-end", "over");
    }
  }

  function moveDrag(e) {
    const dx = e.clientX - drag.x0, dy = e.clientY - drag.y0;
    if (!drag.moved && Math.hypot(dx, dy) < 5) return;
    drag.moved = true;
    drag.li.classList.add("dragging");
    drag.li.style.transform = `translate(${dx}px, ${dy}px)`;
    clearMarks();
    const t = dropTarget(e.clientX, e.clientY);
    if (t && t.zone === "ranking") {
      $("ranking-zone").classList.add("over");
      if (t.before) t.before.classList.add("drop-before"); else $("ranking").classList.add("drop-end");
    } else if (t) {
      $("pool-zone").classList.add("over");
    }
  }

  function endDrag(e) {
    const d = drag;
    drag = null;
    d.li.removeEventListener("pointermove", moveDrag);
    d.li.removeEventListener("pointerup", endDrag);
    d.li.removeEventListener("pointercancel", endDrag);
    clearMarks();
    if (e.type === "pointercancel") { render(); return; }
    const wasPicked = picked.includes(d.pos);
    if (!d.moved) {  // a click: pick it, or send a ranked one back
      if (wasPicked) removeAt(picked.indexOf(d.pos));
      else { insertAt(picked.length, d.pos); autoComplete(); current = d.pos; }
    } else {
      drag = d;  // dropTarget skips the dragged card
      const t = dropTarget(e.clientX, e.clientY);
      drag = null;
      if (t && t.zone === "ranking") {
        insertAt(t.index, d.pos);
        if (!wasPicked) autoComplete();
        current = d.pos;
      } else if (t && t.zone === "pool" && wasPicked) {
        removeAt(picked.indexOf(d.pos));
      }
    }
    if (!picked.includes(current)) current = null;
    render();
  }

  // ---- rendering ----

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function rankLabel(i) {
    let r = 1;
    for (let j = 1; j <= i; j++) if (!tied[j]) r = j + 1;
    const sharing = tied[i] || (i + 1 < picked.length && tied[i + 1]);
    return `#${r}${sharing ? "=" : ""}`;
  }

  function card(pos, i) {
    const li = el("li", "card");
    li.dataset.pos = String(pos);
    const head = el("div", "card-head");
    head.append(el("span", "key", String(pos + 1)));
    if (i !== undefined) {
      head.append(el("span", "rank", rankLabel(i)));
      if (i > 0) {
        const b = el("button", "tie", tied[i] ? "= tied with the one above" : "tie with the one above");
        b.type = "button";
        b.dataset.focus = `tie-${i}`;  // render() gives the focus back to the new button
        b.setAttribute("aria-pressed", String(tied[i]));
        b.addEventListener("click", () => toggleTie(i));
        head.append(b);
      }
      li.classList.toggle("tied", tied[i]);
      li.classList.toggle("current", pos === current);
    }
    li.append(head, el("div", "text", view.item.responses[pos]));
    li.addEventListener("pointerdown", startDrag);
    return li;
  }

  function renderRank() {
    const pool = $("pool"), ranking = $("ranking");
    pool.replaceChildren(...[...Array(k()).keys()].filter((p) => !picked.includes(p)).map((p) => card(p)));
    ranking.replaceChildren(...picked.map((p, i) => card(p, i)));
    $("ranking-empty").hidden = picked.length > 0;
    $("pool-zone").classList.toggle("empty", picked.length === k());
    $("submit").disabled = picked.length !== k();
    $("back").disabled = picked.length === 0;
  }

  function pct(x) { return `${(100 * x).toFixed(1)}%`; }
  function duration(s) { return s >= 60 ? `${Math.ceil(s / 60)} min` : `${Math.max(1, s)} s`; }

  // a prompt is a string, or a conversation: [{role, content}, ...] ending with the user's turn
  function renderPrompt(prompt) {
    const box = $("prompt");
    if (typeof prompt === "string") {
      box.classList.remove("conversation");
      box.textContent = prompt;
      return;
    }
    box.classList.add("conversation");
    box.replaceChildren(...prompt.map((m) => {
      const turn = el("div", "turn");
      turn.dataset.role = Object.hasOwn(ROLE_NAMES, m.role) ? m.role : "other";
      turn.append(el("span", "role", ROLE_NAMES[m.role] || String(m.role)), el("div", "text", String(m.content)));
      return turn;
    }));
  }

  function renderDone() {
    const p = view.progress;
    $("done-text").textContent = p.done >= p.total
      ? `Every prompt is judged (${p.done} of ${p.total}). Thank you! You can close this page.`
      : `No prompt is left for you now (${p.done} of ${p.total} done). ` + (view.held_by_others
        ? `Other sessions hold ${view.held_by_others} prompt${view.held_by_others === 1 ? "" : "s"}; a hold ` +
          `left without a judgement expires, the first in about ${duration(view.first_free_in)}. `
        : "The rest wait for a second annotator (overlapped prompts). ") + "Reload later to check.";
    const r = view.result;
    $("result").hidden = !r;
    if (r) {
      $("r-a").textContent = r.model_a;
      $("r-b").textContent = r.model_b;
      $("r-rate").textContent = r.judgements
        ? `${pct(r.win_rate_a)} (95% CI ${pct(r.ci95[0])} – ${pct(r.ci95[1])})` : "no judgements";
      $("r-n").textContent = `${r.judgements}: A better ${r.a_wins}, B better ${r.b_wins}, ties ${r.ties}`;
    }
  }

  // the page is rebuilt on every change: a control that had the focus (a tie button reached
  // with Tab) gets it back in its new copy, so keyboard use goes on where it was
  function render() {
    const active = document.activeElement;
    const had = active && active.dataset ? active.dataset.focus : undefined;
    draw();
    const again = had && document.querySelector(`[data-focus="${had}"]`);
    if (again && again !== document.activeElement) again.focus();
  }

  function draw() {
    const item = view.item, compare = view.mode === "compare";
    const p = view.progress;
    $("loading").hidden = true;
    $("mode-name").textContent = compare ? "compare" : "label";
    $("bar").max = Math.max(p.total, 1);
    $("bar").value = p.done;
    $("count").textContent = `${p.done} / ${p.total} done`;
    const parts = [];
    if (p.judged) {
      parts.push(`you: ${p.judged} judged, ${p.mean_seconds.toFixed(1)} s per judgement on average ` +
                 `(last ${p.last_seconds.toFixed(1)} s)`);
    }
    if (p.skipped) parts.push(`${p.skipped} skipped`);
    $("timing").textContent = parts.join(", ");
    $("prompt-box").hidden = !item;
    $("rank-view").hidden = !item || compare;
    $("compare-view").hidden = !item || !compare;
    $("done-view").hidden = !!item;
    for (const id of ["submit", "back"]) $(id).hidden = !item || compare;
    for (const id of ["pick-left", "pick-tie", "pick-right"]) $(id).hidden = !item || !compare;
    $("skip").hidden = !item;
    $("undo").hidden = !view.can_undo || !!view.result;  // a revealed result: the judgements are final
    $("help-rank").hidden = compare;
    $("help-compare").hidden = !compare;
    if (!item) { renderDone(); return; }
    renderPrompt(item.prompt);
    if (compare) {
      $("left").textContent = item.responses[0];
      $("right").textContent = item.responses[1];
    } else {
      renderRank();
    }
  }

  function show(v) {
    view = v;
    setSession(v.session);
    picked = [];
    tied = [];
    current = null;
    render();
  }

  // ---- input ----

  document.addEventListener("keydown", (e) => {
    if (!view || busy || e.altKey || e.metaKey) return;
    if (e.ctrlKey) {
      if (e.key === "z") { e.preventDefault(); undo(); }
      return;
    }
    if ((e.key === "Enter" || e.key === " ") && e.target.tagName === "BUTTON") return;  // the button acts
    const key = e.key.toLowerCase(), item = view.item;
    if (key === "u") undo();
    else if (!item) return;
    else if (key === "s") skip();
    else if (view.mode === "compare") {
      if (key === "1" || key === "arrowleft") judgeCompare("left");
      else if (key === "2" || key === "arrowright") judgeCompare("right");
      else if (key === "=" || key === "t") judgeCompare("tie");
      else return;
    } else if (/^[1-9]$/.test(key)) pick(Number(key) - 1);
    else if (key === "=" || key === "t") tieCurrent();
    else if (key === "backspace") takeBack();
    else if (key === "enter") submit();
    else return;
    e.preventDefault();
  });

  // a button clicked with the mouse gives its focus back, so Enter submits rather than
  // pressing that button again; a button reached with Tab keeps it (Enter / Space press it).
  // The active element, not the target: a tie button is replaced (and refocused) by render()
  document.addEventListener("click", (e) => {
    const a = document.activeElement;
    if (e.detail > 0 && e.target.closest("button") && a && a.tagName === "BUTTON") a.blur();
  });
  $("submit").addEventListener("click", submit);
  $("back").addEventListener("click", takeBack);
  $("pick-left").addEventListener("click", () => judgeCompare("left"));
  $("pick-right").addEventListener("click", () => judgeCompare("right"));
  $("pick-tie").addEventListener("click", () => judgeCompare("tie"));
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);

  call("/api/next", {});
})();
