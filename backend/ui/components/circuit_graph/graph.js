// The Circuit Graph's drawing: filters the graph the page computed once (backend/circuits/view.py: payload) in the
// browser on every slider move, pin, hide, search or grouping, and draws it with plotly.js (served from the plotly
// Python package, no network). Hand-written because no maintained Streamlit component filters a plotly graph by
// these rules; visibleView() mirrors backend.circuits.view.apply_view line for line (the page scores and exports
// that copy). Untrusted text (tokens, labels, supernode names) reaches plotly only through esc() (or the page's
// escaping) and the page only as textContent, never as HTML.
"use strict";

const G = { graph: null, key: null, rev: null, state: null, selection: [], selectedSuper: null, timer: null,
            nonce: 0, drawn: null, maxLines: 3000 };

// ---- Streamlit's component protocol (what streamlit-component-lib does, without a bundler) ----
function send(type, extra) {
  window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type }, extra), "*");
}
function setValue(event) {
  G.nonce += 1;
  send("streamlit:setComponentValue", { value: { event, nonce: `${Date.now()}-${G.nonce}`, state: G.state,
    selection: G.selection, supernode: G.selectedSuper }, dataType: "json" });
}
window.addEventListener("message", (ev) => {
  if (ev.data && ev.data.type === "streamlit:render") render(ev.data.args || {});
});
send("streamlit:componentReady", { apiVersion: 1 });

// ---- escaping: plotly reads text as a little HTML; entities are shown, never parsed as tags ----
const CONTROL = /[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;
function esc(text) {
  return String(text).replace(CONTROL, (c) => `⟨U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}⟩`)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}
const el = (id) => document.getElementById(id);

function render(args) {
  const graph = args.graph;
  if (!graph) return;
  if (args.graph_key !== G.key) {  // another graph: start from the page's state
    G.graph = graph; G.key = args.graph_key; G.selection = []; G.selectedSuper = null;
    G.index = new Map(graph.nodes.id.map((id, i) => [id, i]));
    G.rev = null;
  }
  if (args.rev !== G.rev) {  // the page changed the view (a link, a label, a reload): adopt it
    G.rev = args.rev;
    G.state = JSON.parse(JSON.stringify(args.state));
    syncControls();
  }
  G.height = args.height || 600;
  draw();
}

function syncControls() {
  const s = G.state;
  el("nt").value = s.node_threshold; el("et").value = s.edge_threshold; el("et").max = G.graph.edgeMax;
  el("err").checked = s.show_errors; el("q").value = s.search || "";
  el("ntv").textContent = Number(s.node_threshold).toFixed(2);
  el("etv").textContent = Number(s.edge_threshold).toFixed(2);
}

// ---- the filter: backend.circuits.view.apply_view ----
function inPrefix(start, t) { return t >= 1 || start < t; }

// A search, a click or a selection changes only the emphasis: the filtered view is reused (one pass over every edge
// of the full graph costs ~0.1 s on a 144k-edge graph).
function visibleView(state) {
  const key = JSON.stringify([G.key, state.node_threshold, state.edge_threshold, state.pinned, state.hidden,
                              state.show_errors]);
  if (G.view && G.view.key === key) return G.view.value;
  G.view = { key, value: filterView(state) };
  return G.view.value;
}

function filterView(state) {
  const g = G.graph, N = g.nodes.id.length, E = g.edges.s.length, target = g.target;
  const nt = state.node_threshold, et = Math.min(state.edge_threshold, g.edgeMax);
  const kept = new Uint8Array(N);
  for (let i = 0; i < N; i++) kept[i] = (i === target || inPrefix(g.nodes.start[i], nt)) ? 1 : 0;
  // edges in their prefix with both ends kept, then only nodes with a kept path to the target
  const into = Array.from({ length: N }, () => []);
  for (let e = 0; e < E; e++) {
    const s = g.edges.s[e], t = g.edges.t[e];
    if (inPrefix(g.edges.start[e], et) && kept[s] && kept[t]) into[t].push(e);
  }
  const reach = new Uint8Array(N);
  reach[target] = 1;
  const stack = [target];
  while (stack.length) {
    const t = stack.pop();
    for (const e of into[t]) { const s = g.edges.s[e]; if (!reach[s]) { reach[s] = 1; stack.push(s); } }
  }
  const pinned = new Set(state.pinned.map((id) => G.index.get(id)).filter((i) => i !== undefined));
  const hidden = new Set(state.hidden.map((id) => G.index.get(id)).filter((i) => i !== undefined));
  if (!state.show_errors) g.nodes.kind.forEach((k, i) => { if (g.errorKinds.includes(k)) hidden.add(i); });
  hidden.delete(target);
  const show = new Uint8Array(N);
  for (let i = 0; i < N; i++) show[i] = (reach[i] || pinned.has(i)) && !hidden.has(i) ? 1 : 0;
  const edges = [];
  for (let e = 0; e < E; e++) {
    const s = g.edges.s[e], t = g.edges.t[e];
    if (!show[s] || !show[t]) continue;
    const pruned = inPrefix(g.edges.start[e], et) && reach[s] && reach[t];
    if (pruned || pinned.has(s) || pinned.has(t)) edges.push(e);
  }
  return { show, edges, pinned, hidden };
}

// ---- layout: backend.circuits.layout.layout over the nodes shown (so a pruned view spreads its own cells) ----
function layoutShown(items) {
  // items: [{key, row, pos, size, id}] -> Map key -> x, and the token columns [{centre, width}]
  const L = G.graph.layout, cells = new Map(), crowd = new Map();
  for (const it of items) {
    const k = `${it.row}|${it.pos}`;
    if (!cells.has(k)) cells.set(k, []);
    cells.get(k).push(it);
  }
  for (const [k, members] of cells) {
    members.sort((a, b) => (b.size - a.size) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const pos = Number(k.split("|")[1]);
    crowd.set(pos, Math.max(crowd.get(pos) || 0, members.length));
  }
  const nPos = Math.max(G.graph.tokens.length, ...[...crowd.keys()].map((p) => p + 1));
  const cols = [];
  let left = -0.5;
  for (let p = 0; p < nPos; p++) {
    const width = Math.min(L.maxColumn, Math.max(1, ((crowd.get(p) || 1) - 1) * L.maxSpacing / L.cellWidth));
    cols.push({ centre: left + width / 2, width });
    left += width;
  }
  const x = new Map();
  for (const [k, members] of cells) {
    const { centre, width } = cols[Number(k.split("|")[1])], n = members.length;
    const spacing = n > 1 ? Math.min(L.cellWidth * width / (n - 1), L.maxSpacing * width) : 0;
    members.forEach((it, i) => x.set(it.key, centre + (i - (n - 1) / 2) * spacing));
  }
  return { x, cols };
}

// ---- drawing ----
const EDGE_BINS = [[0.1, 0.6, 0.3], [0.3, 1.3, 0.5], [0.6, 2.4, 0.7], [Infinity, 3.6, 0.9]];

function labelOf(i) {
  const id = G.graph.nodes.id[i];
  return G.state.labels[id] || G.graph.nodes.label[i];
}

function draw() {
  const g = G.graph, s = G.state, t0 = performance.now();
  const v = visibleView(s);
  const N = g.nodes.id.length;
  // supernodes: visible members drawn as one node at their mean position
  const groupOf = new Map();
  const supers = [];
  s.supernodes.forEach((sn, k) => {
    const members = sn.slice(1).map((id) => G.index.get(id)).filter((i) => i !== undefined && v.show[i]);
    if (!members.length) return;
    members.forEach((i) => groupOf.set(i, k));
    const row = Math.max(...members.map((i) => g.nodes.row[i]));
    const pos = Math.max(...members.map((i) => g.nodes.pos[i]));
    const size = members.reduce((a, i) => a + g.nodes.size[i], 0);
    supers.push({ k, name: sn[0], members, row, pos, size });
  });
  const items = [];
  for (let i = 0; i < N; i++) if (v.show[i] && !groupOf.has(i))
    items.push({ key: i, row: g.nodes.row[i], pos: g.nodes.pos[i], size: g.nodes.size[i], id: g.nodes.id[i] });
  supers.forEach((sp) => items.push({ key: `S${sp.k}`, row: sp.row, pos: sp.pos, size: sp.size, id: sp.name }));
  const placed = layoutShown(items);
  supers.forEach((sp) => { sp.x = placed.x.get(`S${sp.k}`); });
  const superByK = new Map(supers.map((sp) => [sp.k, sp]));
  // collapse the rows nothing visible sits in
  const rowsUsed = new Set();
  for (let i = 0; i < N; i++) if (v.show[i] && !groupOf.has(i)) rowsUsed.add(g.nodes.row[i]);
  supers.forEach((sp) => rowsUsed.add(sp.row));
  const rows = [...rowsUsed].sort((a, b) => a - b);
  const yOf = new Map(rows.map((r, j) => [r, j]));
  const pt = (i) => groupOf.has(i) ? superByK.get(groupOf.get(i)) : { x: placed.x.get(i), row: g.nodes.row[i] };
  // search: case-insensitive match on the label (a person's label first) or the id
  const q = (s.search || "").trim().toLowerCase();
  const match = new Set();
  if (q) for (let i = 0; i < N; i++)
    if (v.show[i] && (labelOf(i).toLowerCase().includes(q) || g.nodes.id[i].toLowerCase().includes(q))) match.add(i);
  const selected = s.selected !== null && s.selected !== undefined ? G.index.get(s.selected) : undefined;
  const chosen = new Set(G.selection.map((id) => G.index.get(id)).filter((i) => i !== undefined));
  const focus = new Set([...match, ...chosen]);
  if (selected !== undefined) focus.add(selected);
  const emphasis = focus.size > 0;

  // edges: merged per supernode pair, binned by sign and |weight| into a few line traces
  const merged = new Map();
  for (const e of v.edges) {
    const a = g.edges.s[e], b = g.edges.t[e];
    const ka = groupOf.has(a) ? `S${groupOf.get(a)}` : a, kb = groupOf.has(b) ? `S${groupOf.get(b)}` : b;
    if (ka === kb) continue;
    const key = `${ka}|${kb}`;
    const m = merged.get(key) || { a, b, w: 0, strong: false };
    m.w += g.edges.w[e];
    m.strong = m.strong || focus.has(a) || focus.has(b);
    merged.set(key, m);
  }
  let wmax = 0;
  for (const m of merged.values()) wmax = Math.max(wmax, Math.abs(m.w));
  // Drawing every kept edge of a large view costs plotly about 40 µs each (a second for 23k on a laptop core) and
  // draws a hairball; the strongest G.maxLines are drawn (the focused nodes' edges first), all are kept.
  let toDraw = [...merged.values()].filter((m) => m.w && wmax);
  const nKept = toDraw.length;
  if (nKept > G.maxLines) {
    toDraw.sort((a, b) => (b.strong - a.strong) || (Math.abs(b.w) - Math.abs(a.w)));
    toDraw = toDraw.slice(0, G.maxLines);
  }
  const groups = new Map();
  for (const m of toDraw) {
    const rel = Math.abs(m.w) / wmax, b = EDGE_BINS.findIndex(([u]) => rel <= u);
    const strong = !emphasis || m.strong, key = `${strong ? 1 : 0}${m.w > 0 ? "+" : "-"}${b}`;
    if (!groups.has(key)) groups.set(key, { strong, pos: m.w > 0, b, x: [], y: [] });
    const gr = groups.get(key), p = pt(m.a), r = pt(m.b);
    gr.x.push(p.x, r.x, null); gr.y.push(yOf.get(p.row), yOf.get(r.row), null);
  }
  const traces = [];
  const legendSeen = new Set();
  [...groups.values()].sort((a, b) => (a.strong - b.strong) || (a.b - b.b)).forEach((gr) => {
    let [, width, alpha] = EDGE_BINS[gr.b];
    if (emphasis) [alpha, width] = gr.strong ? [Math.min(1, alpha + 0.1), width * 1.3] : [alpha * 0.3, width];
    const rgb = gr.pos ? "31, 119, 180" : "214, 39, 40";
    const name = gr.pos ? "positive edge" : "negative edge";
    traces.push({ type: "scatter", mode: "lines", x: gr.x, y: gr.y, hoverinfo: "skip", name,
                  line: { color: `rgba(${rgb}, ${alpha.toFixed(3)})`, width }, legendgroup: name,
                  showlegend: !legendSeen.has(name) && (legendSeen.add(name), true) });
  });
  // nodes: one trace per kind; error nodes open symbols so they read as "what the dictionaries miss"
  let smax = 0;
  for (let i = 0; i < N; i++) if (v.show[i] && i !== g.target) smax = Math.max(smax, g.nodes.size[i]);
  const sizeOf = (i) => i === g.target ? 24 : smax > 0 ? 7 + 17 * Math.sqrt(g.nodes.size[i] / smax) : 7;
  const ranked = [];
  for (let i = 0; i < N; i++) if (v.show[i] && !groupOf.has(i)) ranked.push(i);
  ranked.sort((a, b) => g.nodes.size[b] - g.nodes.size[a]);
  const named = new Set(ranked.filter((i) => !g.errorKinds.includes(g.nodes.kind[i])).slice(0, 20));
  // names on the graph: the largest nodes, then the focused and pinned ones (at most 40: plotly lays out every label)
  [...focus].sort((a, b) => g.nodes.size[b] - g.nodes.size[a]).slice(0, 30).forEach((i) => named.add(i));
  [selected, g.target, ...v.pinned].filter((i) => i !== undefined).slice(0, 12).forEach((i) => named.add(i));
  Object.keys(g.kinds).forEach((kind) => {
    const ids = ranked.filter((i) => g.nodes.kind[i] === kind);
    if (!ids.length) return;
    const style = g.kinds[kind], isError = g.errorKinds.includes(kind);
    const on = (i) => !emphasis || focus.has(i);
    traces.push({
      type: "scatter", mode: "markers+text", name: style.name, legendgroup: kind,
      x: ids.map((i) => placed.x.get(i)), y: ids.map((i) => yOf.get(g.nodes.row[i])),
      customdata: ids.map((i) => g.nodes.id[i]),
      text: ids.map((i) => named.has(i) ? esc(labelOf(i).slice(0, 28)) : ""),
      textposition: "top center", textfont: { size: 10, color: "#444" },
      hovertext: ids.map((i) => (G.state.labels[g.nodes.id[i]] ? `<b>${esc(G.state.labels[g.nodes.id[i]])}</b><br>` : "")
        + g.nodes.hover[i]), hoverinfo: "text",
      marker: { symbol: isError ? `${style.symbol}-open` : style.symbol, color: style.color,
                size: ids.map(sizeOf), opacity: ids.map((i) => on(i) ? 1 : 0.35),
                line: { width: ids.map((i) => i === selected ? 3 : focus.has(i) || v.pinned.has(i) ? 2 : isError ? 1.5 : 0.8),
                        color: ids.map((i) => i === selected ? "#ff2b2b" : focus.has(i) ? "#111" :
                                         v.pinned.has(i) ? "#d4a017" : isError ? style.color : "#fff") },
      },
    });
  });
  if (supers.length) traces.push({
    type: "scatter", mode: "markers+text", name: "supernode", x: supers.map((sp) => sp.x),
    y: supers.map((sp) => yOf.get(sp.row)), customdata: supers.map((sp) => `supernode:${sp.k}`),
    text: supers.map((sp) => esc(sp.name)), textposition: "top center", textfont: { size: 11, color: "#222" },
    hovertext: supers.map((sp) => `<b>${esc(sp.name)}</b><br>${sp.members.length} nodes: ` +
      sp.members.slice(0, 12).map((i) => esc(g.nodes.id[i])).join(", ")), hoverinfo: "text",
    marker: { symbol: "square", size: 26, color: "rgba(120, 120, 220, 0.35)", line: { width: 2, color: "#5050c0" } },
  });
  const layout = {
    height: G.height, margin: { l: 62, r: 8, t: 8, b: 46 }, template: "plotly_white", hovermode: "closest",
    showlegend: false,
    hoverlabel: { font: { size: 13 }, align: "left" }, dragmode: G.dragmode || "zoom", uirevision: G.key,
    legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", font: { size: 11 } },
    xaxis: { tickmode: "array", tickvals: placed.cols.map((c) => c.centre), ticktext: g.tokens.concat(
               placed.cols.slice(g.tokens.length).map((_, j) => `${g.tokens.length + j}`)), showgrid: true,
             zeroline: false, range: [-0.6, placed.cols.reduce((a, c) => a + c.width, 0) - 0.4] },
    yaxis: { tickmode: "array", tickvals: rows.map((_, j) => j), ticktext: rows.map((r) => esc(g.rows[r])),
             range: [-0.6, rows.length - 0.4], showgrid: true, zeroline: false },
    plot_bgcolor: "#fff",
  };
  const div = el("plot");
  Plotly.react(div, traces, layout, { displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["autoScale2d", "toggleSpikelines"] });
  if (!div._circuitBound) bindPlot(div);
  let nShown = 0;
  for (let i = 0; i < N; i++) nShown += v.show[i];
  G.drawn = { nodes: nShown, edges: v.edges.length, linesDrawn: toDraw.length,
              lines: toDraw.map((m) => [g.nodes.id[m.a], g.nodes.id[m.b]]), ms: performance.now() - t0, ids: ranked.map((i) => g.nodes.id[i]),
              supernodes: supers.map((sp) => sp.name), named: [...named].filter((i) => v.show[i] && !groupOf.has(i))
                .map((i) => labelOf(i)), found: [...match].map((i) => g.nodes.id[i]), state: s };
  el("status").textContent = `${nShown} nodes, ${v.edges.length} edges shown` +
    (toDraw.length < nKept ? ` (the ${toDraw.length} strongest of ${nKept} lines drawn)` : "") +
    (v.hidden.size ? ` · ${v.hidden.size} hidden` : "") + (v.pinned.size ? ` · ${v.pinned.size} pinned` : "") +
    (G.selection.length ? ` · ${G.selection.length} selected` : "");
  el("found").textContent = q ? `${match.size} match${match.size === 1 ? "" : "es"}` : "";
  send("streamlit:setFrameHeight", { height: document.body.scrollHeight });
}

function bindPlot(div) {
  div._circuitBound = true;
  div.on("plotly_click", (ev) => {
    const id = ev.points && ev.points[0] && ev.points[0].customdata;
    if (typeof id !== "string") return;
    if (id.startsWith("supernode:")) {
      G.selectedSuper = G.state.supernodes[Number(id.slice(10))][0];
    } else {
      G.state.selected = id; G.selectedSuper = null;
    }
    draw(); setValue("click");
  });
  div.on("plotly_selected", (ev) => {
    if (!ev || !ev.points) return;
    G.selection = [...new Set(ev.points.map((p) => p.customdata)
      .filter((c) => typeof c === "string" && !c.startsWith("supernode:")))].slice(0, 60);
    draw(); setValue("select");
  });
  div.on("plotly_relayout", (ev) => { if (ev && ev.dragmode) G.dragmode = ev.dragmode; });
}

// ---- controls: the drawing answers at once; the page hears of it a moment after the last change ----
function changed(now) {
  draw();
  clearTimeout(G.timer);
  if (now) setValue("view"); else G.timer = setTimeout(() => setValue("view"), 700);
}
function targets() {
  const ids = G.selection.length ? G.selection : (G.state.selected ? [G.state.selected] : []);
  return ids.filter((id) => G.index.has(id));
}
el("nt").addEventListener("input", () => {
  G.state.node_threshold = Number(el("nt").value); el("ntv").textContent = G.state.node_threshold.toFixed(2); changed();
});
el("et").addEventListener("input", () => {
  G.state.edge_threshold = Number(el("et").value); el("etv").textContent = G.state.edge_threshold.toFixed(2); changed();
});
el("err").addEventListener("change", () => { G.state.show_errors = el("err").checked; changed(); });
el("q").addEventListener("input", () => { G.state.search = el("q").value.slice(0, 100); changed(); });
el("pin").addEventListener("click", () => {
  G.state.pinned = [...new Set([...G.state.pinned, ...targets()])].slice(0, 100);
  G.state.hidden = G.state.hidden.filter((id) => !G.state.pinned.includes(id)); changed(true);
});
el("hide").addEventListener("click", () => {
  const tgt = G.graph.nodes.id[G.graph.target];
  G.state.hidden = [...new Set([...G.state.hidden, ...targets().filter((id) => id !== tgt)])].slice(0, 100);
  G.state.pinned = G.state.pinned.filter((id) => !G.state.hidden.includes(id)); changed(true);
});
el("unhide").addEventListener("click", () => { G.state.hidden = []; changed(true); });
el("unpin").addEventListener("click", () => { G.state.pinned = []; changed(true); });
el("group").addEventListener("click", () => {
  const members = targets(), name = el("snname").value.trim().slice(0, 60);
  if (!members.length || !name) { el("status").textContent = "Select nodes (box or lasso) and name the group first."; return; }
  const others = G.state.supernodes.filter((sn) => sn[0] !== name)
    .map((sn) => [sn[0], ...sn.slice(1).filter((id) => !members.includes(id))]).filter((sn) => sn.length > 1);
  G.state.supernodes = [...others, [name, ...members]].slice(-20);
  el("snname").value = ""; G.selection = []; changed(true);
});
el("ungroup").addEventListener("click", () => { G.state.supernodes = []; G.selectedSuper = null; changed(true); });

// for tests and the latency benchmark: what is drawn right now
window.circuitGraph = () => G.drawn;
