// The SuperNode dashboard: polls api/v1/dashboard once a second and draws
// the summary, the traffic chart, every task's swarm (one bitmap cell per
// piece) and the registered peers.  Plain DOM and canvas, no libraries.
"use strict";

(function () {
  const POLL_MS = 1000;
  const RETRY_MS = 2000;
  const MAX_CELLS = 1024;   // above this, one cell stands for several pieces
  const MAX_COLUMNS = 64;
  const KINDS = [
    // drawn bottom to top
    { key: "originBytes", css: "--origin", name: "origin" },
    { key: "seedBytes", css: "--seed", name: "seed" },
    { key: "peerBytes", css: "--peer", name: "peer" },
  ];

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- formatting -------------------------------------------------------------

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
  }

  const fmtRate = (n) => `${fmtBytes(n)}/s`;

  function fmtAge(seconds) {
    if (seconds < 1) return "now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  function pct(part, whole) {
    return whole > 0 ? Math.round((100 * part) / whole) : 0;
  }

  function fileName(url) {
    try {
      const path = new URL(url).pathname;
      const last = path.split("/").filter(Boolean).pop();
      return last ? decodeURIComponent(last) : url;
    } catch (e) {
      return url;
    }
  }

  // -- traffic ----------------------------------------------------------------

  // rates (bytes/s) between consecutive samples: [{t, originBytes, ...}]
  function rates(samples) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1], b = samples[i];
      const dt = b.t - a.t;
      if (dt <= 0) continue;
      const r = { t: b.t };
      for (const k of KINDS) r[k.key] = Math.max(0, (b[k.key] - a[k.key]) / dt);
      out.push(r);
    }
    return out;
  }

  function niceCeil(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // a "nice" byte rate above v, in powers of 1024 so the labels read well
  function niceRate(v) {
    if (v <= 0) return 1024;
    let unit = 1;
    while (v / unit >= 1024) unit *= 1024;
    return niceCeil(v / unit) * unit;
  }

  function drawChart(samples, sampleInterval) {
    const canvas = $("chart");
    const box = canvas.parentElement;
    const dpr = window.devicePixelRatio || 1;
    const w = box.clientWidth, h = box.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const style = getComputedStyle(document.documentElement);
    const color = (name) => style.getPropertyValue(name).trim();
    const pad = { left: 78, right: 12, top: 10, bottom: 24 };
    const pw = w - pad.left - pad.right, ph = h - pad.top - pad.bottom;
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";

    const rs = rates(samples);
    const last = samples.length ? samples[samples.length - 1].t : 0;
    const span = samples.length > 1 ? last - samples[0].t : 0;
    const windowSec = Math.min(300, Math.max(60, span));
    const x = (t) => pad.left + pw * (1 - (last - t) / windowSec);
    let peak = 0;
    for (const r of rs) peak = Math.max(peak, r.originBytes + r.seedBytes + r.peerBytes);
    const top = niceRate(peak);
    const y = (v) => pad.top + ph * (1 - v / top);

    // grid and y labels
    ctx.strokeStyle = color("--line");
    ctx.fillStyle = color("--muted");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, yy);
      ctx.lineTo(w - pad.right, yy);
      ctx.stroke();
      ctx.fillText(i === 0 ? "0" : fmtRate(v).replace(".0 ", " "), pad.left - 8, yy);
    }
    // x labels: seconds before the newest sample
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = windowSec <= 60 ? 10 : windowSec <= 150 ? 30 : 60;
    for (let s = 0; s <= windowSec + 0.001; s += step) {
      const xx = x(last - s);
      const label = s === 0 ? "now" : s < 60 ? `−${s} s` : `−${s / 60} min`;
      ctx.fillText(label, Math.min(Math.max(xx, pad.left + 14), w - pad.right - 14), h - pad.bottom + 7);
    }

    if (rs.length >= 1 && peak === 0) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no piece traffic in this window", pad.left + pw / 2, pad.top + ph / 2);
    }
    if (rs.length < 1) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(samples.length ? "collecting samples…" : "no samples yet", pad.left + pw / 2, pad.top + ph / 2);
      $("chart-note").textContent = "";
      return;
    }
    // stacked areas, bottom to top
    const visible = rs.filter((r) => last - r.t <= windowSec + sampleInterval);
    const base = visible.map(() => 0);
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.left, pad.top, pw, ph);
    ctx.clip();
    for (const kind of KINDS) {
      const topLine = visible.map((r, i) => base[i] + r[kind.key]);
      ctx.beginPath();
      visible.forEach((r, i) => {
        // a step per sample: the rate held over the interval that ends at r.t
        const x0 = x(r.t - (i > 0 ? r.t - visible[i - 1].t : sampleInterval)), x1 = x(r.t);
        if (i === 0) ctx.moveTo(x0, y(topLine[i]));
        ctx.lineTo(x0, y(topLine[i]));
        ctx.lineTo(x1, y(topLine[i]));
      });
      for (let i = visible.length - 1; i >= 0; i--) {
        const r = visible[i];
        const x0 = x(r.t - (i > 0 ? r.t - visible[i - 1].t : sampleInterval)), x1 = x(r.t);
        ctx.lineTo(x1, y(base[i]));
        ctx.lineTo(x0, y(base[i]));
      }
      ctx.closePath();
      ctx.fillStyle = color(kind.css);
      ctx.globalAlpha = 0.85;
      ctx.fill();
      ctx.globalAlpha = 1;
      topLine.forEach((v, i) => { base[i] = v; });
    }
    ctx.restore();
    $("chart-note").textContent = `last ${Math.round(windowSec / 60 * 10) / 10} min, bytes per second`;
  }

  // -- bitmaps ----------------------------------------------------------------

  function decodeBitmap(b64) {
    if (!b64) return null;
    const raw = atob(b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  const hasPiece = (bytes, i) => bytes !== null && (bytes[i >> 3] & (0x80 >> (i & 7))) !== 0;

  // one cell per piece; on very large files one cell per group of pieces
  // ("part" when the group is partly held)
  function renderBitmap(grid, b64, count, note) {
    grid.dataset.note = note;  // shown (by the stylesheet) when there is no cell
    count = count || 0;
    const bytes = decodeBitmap(b64);
    const per = Math.max(1, Math.ceil(count / MAX_CELLS));
    const cells = Math.ceil(count / per);
    // rows of equal length: 96 cells make two rows of 48, not 64 + 32
    const cols = cells ? Math.ceil(cells / Math.ceil(cells / MAX_COLUMNS)) : 1;
    if (grid.childElementCount !== cells) {
      grid.replaceChildren();
      for (let c = 0; c < cells; c++) grid.appendChild(el("span", "cell"));
      grid.style.gridTemplateColumns = `repeat(${cols}, minmax(3px, 1fr))`;
      grid.style.maxWidth = `${cols * 12}px`;
    }
    let held = 0;
    for (let c = 0; c < cells; c++) {
      let n = 0;
      const first = c * per, end = Math.min(count, first + per);
      for (let i = first; i < end; i++) if (hasPiece(bytes, i)) n++;
      held += n;
      const cls = n === end - first ? "cell on" : n > 0 ? "cell part" : "cell";
      const cell = grid.children[c];
      if (cell.className !== cls) cell.className = cls;
      if (per > 1) cell.title = `pieces ${first}–${end - 1}: ${n} of ${end - first}`;
      else cell.title = `piece ${first}`;
    }
    grid.dataset.pieces = String(count);
    grid.dataset.held = String(held);
    return per;
  }

  // -- tasks ------------------------------------------------------------------

  function makeTaskCard(taskId) {
    const card = el("article", "task");
    card.dataset.taskId = taskId;
    const head = el("div", "task-head");
    card._badge = head.appendChild(el("span", "badge"));
    card._name = head.appendChild(el("h3"));
    card._meta = head.appendChild(el("span", "muted"));
    head.appendChild(el("span", "spacer"));
    const id = head.appendChild(el("span", "mono muted", taskId.slice(0, 12) + "…"));
    id.title = `task ${taskId}`;
    card.appendChild(head);
    card._url = card.appendChild(el("div", "url mono"));
    card._error = card.appendChild(el("div", "error"));
    const split = card.appendChild(el("div", "split"));
    const bar = split.appendChild(el("div", "bar"));
    card._bars = KINDS.map((k) => bar.appendChild(el("span", `kind-${k.name}`)));
    card._splitText = split.appendChild(el("div"));
    const table = card.appendChild(el("table", "swarm"));
    const hr = table.appendChild(el("thead")).appendChild(el("tr"));
    for (const [label, cls] of [["Holder", ""], ["Pieces", "num"], ["Progress", ""], ["Bitmap (one cell per piece)", ""]]) {
      hr.appendChild(el("th", cls, label));
    }
    card._bitmapHeader = hr.lastChild;
    card._rows = table.appendChild(el("tbody"));
    card._rowMap = new Map();
    return card;
  }

  function makeRow(key, isSeed) {
    const tr = el("tr", isSeed ? "seed" : "member");
    tr.dataset.peerId = key;
    tr._who = tr.appendChild(el("td", "who"));
    tr._count = tr.appendChild(el("td", "count"));
    const meter = tr.appendChild(el("td", "progress")).appendChild(el("div", "meter"));
    tr._fill = meter.appendChild(el("div", "track")).appendChild(el("div", "fill"));
    tr._pct = meter.appendChild(el("span", "pct"));
    tr._grid = tr.appendChild(el("td")).appendChild(el("div", "bitmap"));
    return tr;
  }

  function updateRow(tr, label, title, done, total, b64, finished, note) {
    tr._who.replaceChildren(el("span", tr.classList.contains("seed") ? "" : "mono", label));
    if (finished) tr._who.appendChild(el("span", "done-mark", "✓"));
    tr._who.title = title;
    tr._count.textContent = total === null ? `${done} / ?` : `${done} / ${total}`;
    const p = total ? (100 * done) / total : 0;
    tr._fill.style.width = `${p}%`;
    tr._pct.textContent = total ? `${Math.floor(p)}%` : "";
    return renderBitmap(tr._grid, b64, total, note);
  }

  // the swarm's state: the CDN's status says only whether the origin fetch is done
  function taskState(task) {
    if (task.status === "failed") return ["failed", "failed"];
    if (task.status !== "success") return ["fetching", "fetching origin"];
    if (task.members.length === 0) return ["cached", "cached"];
    if (task.members.every((m) => m.done)) return ["done", "done"];
    return ["downloading", "downloading"];
  }

  function updateTask(card, task) {
    const status = task.status || "waiting";
    const [state, label] = taskState(task);
    card._badge.className = `badge ${state}`;
    card._badge.textContent = label;
    card._badge.title = `origin fetch: ${status}`;
    card._name.textContent = fileName(task.url);
    card._name.title = task.url;
    const meta = [];
    if (task.contentLength !== null) meta.push(fmtBytes(task.contentLength));
    if (task.pieceCount !== null) meta.push(`${task.pieceCount} pieces of ${fmtBytes(task.pieceSize)}`);
    const done = task.members.filter((m) => m.done).length;
    meta.push(`${task.members.length} peer${task.members.length === 1 ? "" : "s"}, ${done} done`);
    card._meta.textContent = meta.join(" · ");
    card._url.textContent = task.url;
    card._url.title = task.url;
    card._error.textContent = task.error ? `${task.error.code}: ${task.error.message}` : "";
    card._error.hidden = !task.error;

    const parts = [task.originBytes, task.seedBytes, task.peerBytes];
    const sum = parts.reduce((a, b) => a + b, 0);
    card._bars.forEach((bar, i) => { bar.style.width = `${sum ? (100 * parts[i]) / sum : 0}%`; });
    card._splitText.replaceChildren(
      "origin ", el("b", "", fmtBytes(task.originBytes)),
      " · seed ", el("b", "", fmtBytes(task.seedBytes)),
      " · peer to peer ", el("b", "", fmtBytes(task.peerBytes)),
      ` · ${pct(task.peerBytes, task.seedBytes + task.peerBytes)}% of pieces from peers`,
    );

    const count = task.pieceCount;
    const note = count === 0 ? "empty file" : count !== null ? ""
      : task.status === "failed" ? "no pieces" : "piece count not known yet";
    const keys = new Set(["\u0000seed"]);
    let seedRow = card._rowMap.get("\u0000seed");
    if (!seedRow) {
      seedRow = makeRow("supernode", true);
      card._rowMap.set("\u0000seed", seedRow);
    }
    const per = updateRow(seedRow, "SuperNode seed (CDN)", "pieces fetched from the origin, verified and servable",
      task.piecesReady, count, task.seedBitmap, status === "success", note);
    const rows = [seedRow];
    for (const m of task.members) {
      keys.add(m.peerId);
      let tr = card._rowMap.get(m.peerId);
      if (!tr) {
        tr = makeRow(m.peerId, false);
        card._rowMap.set(m.peerId, tr);
      }
      updateRow(tr, m.peerId, `${m.peerId}: ${m.parents} parents, ${m.seedPieces} seed pieces allowed`,
        m.piecesDone, count, m.bitmap, m.done, note);
      rows.push(tr);
    }
    for (const [key, tr] of card._rowMap) {
      if (!keys.has(key)) { tr.remove(); card._rowMap.delete(key); }
    }
    rows.forEach((tr, i) => {
      if (card._rows.children[i] !== tr) card._rows.insertBefore(tr, card._rows.children[i] || null);
    });
    card._bitmapHeader.textContent = per > 1 ? `Bitmap (one cell per ${per} pieces)` : "Bitmap (one cell per piece)";
  }

  const cards = new Map();

  function renderTasks(data) {
    const box = $("tasks");
    const seen = new Set();
    data.tasks.forEach((task, i) => {
      seen.add(task.taskId);
      let card = cards.get(task.taskId);
      if (!card) {
        card = makeTaskCard(task.taskId);
        cards.set(task.taskId, card);
      }
      updateTask(card, task);
      if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
    });
    for (const [id, card] of cards) {
      if (!seen.has(id)) { card.remove(); cards.delete(id); }
    }
    const placeholder = box.querySelector(".empty");
    if (placeholder) placeholder.hidden = data.tasks.length > 0;
    $("tasks-note").textContent = data.taskCount > data.tasks.length
      ? `newest ${data.tasks.length} of ${data.taskCount}` : "";
  }

  // -- peers ------------------------------------------------------------------

  function renderPeers(data) {
    const body = $("peers");
    const rows = data.peers.map((p) => {
      const tr = el("tr");
      tr.dataset.peerId = p.peerId;
      tr.appendChild(el("td", "mono", p.peerId));
      tr.appendChild(el("td", "", p.hostname || "–"));
      tr.appendChild(el("td", "mono", `${p.ip}:${p.port}`));
      tr.appendChild(el("td", "num", String(p.tasks)));
      const age = data.now - p.lastSeen;
      tr.appendChild(el("td", age > 30 ? "num stale" : "num", fmtAge(age)));
      return tr;
    });
    body.replaceChildren(...rows);
    $("peers-empty").hidden = rows.length > 0;
    const active = data.peers.filter((p) => p.tasks > 0).length;
    $("peers-note").textContent = rows.length ? `${active} in a swarm` : "";
  }

  // -- summary ----------------------------------------------------------------

  function renderSummary(data) {
    const t = data.totals;
    const active = data.tasks.filter((x) => ["fetching", "downloading"].includes(taskState(x)[0])).length;
    $("sum-tasks").textContent = String(data.taskCount);
    $("sum-tasks-hint").textContent = `${active} in progress`;
    $("sum-peers").textContent = String(data.peers.length);
    const downloading = new Set();
    for (const task of data.tasks) {
      if (!["fetching", "downloading"].includes(taskState(task)[0])) continue;
      for (const m of task.members) if (!m.done) downloading.add(m.peerId);
    }
    $("sum-peers-hint").textContent = `${downloading.size} downloading`;
    $("sum-origin").textContent = fmtBytes(t.originBytes);
    $("sum-seed").textContent = fmtBytes(t.seedBytes);
    $("sum-peer").textContent = fmtBytes(t.peerBytes);
    const rs = rates(data.traffic);
    const now = rs.length ? rs[rs.length - 1] : null;
    const rate = (k) => (now ? `${fmtRate(now[k])} now` : "\u00a0");
    $("rate-origin").textContent = rate("originBytes");
    $("rate-seed").textContent = rate("seedBytes");
    const share = pct(t.peerBytes, t.seedBytes + t.peerBytes);
    $("rate-peer").textContent = `${share}% of pieces` + (now ? ` · ${fmtRate(now.peerBytes)} now` : "");
  }

  // -- polling ----------------------------------------------------------------

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status-text").textContent = text;
  }

  let lastData = null;

  async function poll() {
    let wait = POLL_MS;
    try {
      const response = await fetch("api/v1/dashboard", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      lastData = data;
      renderSummary(data);
      drawChart(data.traffic, data.sampleInterval || 1);
      renderTasks(data);
      renderPeers(data);
      setStatus("live", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      setStatus("down", `cannot reach the SuperNode (${e.message}); retrying`);
      wait = RETRY_MS;
    }
    setTimeout(poll, wait);
  }

  window.addEventListener("resize", () => {
    if (lastData) drawChart(lastData.traffic, lastData.sampleInterval || 1);
  });
  poll();
})();
