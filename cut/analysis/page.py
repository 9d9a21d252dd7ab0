"""A self-contained HTML page of token cards: one file, inline CSS and JS, no network.

The data travel as one JSON object inside the page and the cards are rendered by JS one page at a
time (`per_page` cards), so a file of thousands of records stays a small DOM. The shell owns the
header, the text filter, sorting, paging, the tooltip and the URL hash (`#q=..&sort=..&page=2`, so a
view can be linked to); a view supplies a script that defines `VIEW`:

    VIEW.state           {key: default} of its own controls, kept in the hash too
    VIEW.sorts           [{key, label, dir: 'asc'|'desc', value(rec)}]; null values sort last
    VIEW.prepare(rec)    once per record (e.g. set rec._hay, the lower-case text the filter searches)
    VIEW.refresh(state)  before filtering, after any control changed
    VIEW.controls(state) HTML of its controls; VIEW.bind(state, update) wires them
    VIEW.legend(state)   HTML above the cards
    VIEW.card(rec, k, state)  one card: root element with data-r=k, tokens as .t elements with data-i
    VIEW.tip(rec, i, state)   the tooltip of token i

Helpers for views: esc, fmtP, fmtNum, diverging(v, max) (blue - white - red) and colourBar(max).
"""

from __future__ import annotations

import base64
import json
from typing import Any

CSS = """
:root { --ink:#1d2430; --mute:#667085; --line:#e4e7ec; --bg:#f6f7f9; --card:#fff; --acc:#3b5bdb;
  --flag:#111827; --span:#7c3aed; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  color:var(--ink); background:var(--bg); }
header.top { padding:18px 28px 10px; background:var(--card); border-bottom:1px solid var(--line); }
header.top h1 { margin:0; font-size:20px; font-weight:650; letter-spacing:-.01em; }
header.top .sub { color:var(--mute); font-size:13px; margin-top:2px; overflow-wrap:anywhere; }
.summary { display:flex; flex-wrap:wrap; gap:6px 8px; margin-top:10px; }
.chip { background:var(--bg); border:1px solid var(--line); border-radius:999px; padding:1px 10px;
  font-size:12.5px; white-space:nowrap; }
.chip b { font-weight:600; }
details.fig { margin-top:8px; font-size:13px; } details.fig summary { cursor:pointer; color:var(--acc); }
details.fig img { max-width:min(100%,900px); margin-top:6px; border:1px solid var(--line); border-radius:6px; }
.bar { position:sticky; top:0; z-index:5; display:flex; flex-wrap:wrap; align-items:center; gap:8px 14px;
  padding:8px 28px; background:#f6f7f9;
  border-bottom:1px solid var(--line); font-size:13px; }
.bar input[type=search] { width:230px; } .bar input[type=number] { width:64px; }
.bar input, .bar select, .bar button { font:inherit; padding:3px 7px; border:1px solid #cfd4dc;
  border-radius:6px; background:#fff; color:var(--ink); }
.bar button { cursor:pointer; } .bar button:disabled { opacity:.4; cursor:default; }
.bar label { color:var(--mute); display:inline-flex; align-items:center; gap:5px; }
.bar select { max-width:190px; }
#viewctl { display:inline-flex; flex-wrap:wrap; gap:8px 14px; }
.pager { display:inline-flex; align-items:center; gap:6px; margin-left:auto; }
.count { color:var(--mute); }
#legend { padding:10px 28px 0; font-size:12.5px; color:var(--mute); display:flex; flex-wrap:wrap;
  align-items:center; gap:6px 18px; }
.cbar { display:inline-flex; align-items:center; gap:6px; }
.cbar i { display:inline-block; width:150px; height:10px; border-radius:3px; border:1px solid var(--line); }
main { padding:12px 28px 40px; max-width:1200px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px 14px;
  margin:0 0 12px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
.card > header { display:flex; flex-wrap:wrap; gap:4px 12px; align-items:baseline; font-size:12.5px;
  color:var(--mute); margin-bottom:6px; }
.card > header .idx { font-weight:650; color:var(--ink); font-size:13px; }
.lab { text-transform:uppercase; letter-spacing:.04em; font-size:10.5px; font-weight:650; color:var(--mute);
  margin-right:6px; }
.ins { font-weight:550; overflow-wrap:anywhere; }
.ins details summary { cursor:pointer; color:var(--acc); font-weight:400; font-size:12px; }
.jud { margin:6px 0 8px; padding:5px 10px; border-left:3px solid var(--acc); background:#f3f5fd;
  border-radius:0 6px 6px 0; white-space:pre-wrap; overflow-wrap:anywhere; }
.resp { white-space:pre-wrap; overflow-wrap:anywhere; line-height:1.85; font-size:14.5px; }
.t { border-radius:3px; padding:1px 0; cursor:default; }
.t:hover { outline:1.5px solid var(--acc); }
.t.flagged { border-bottom:2.5px solid var(--flag); font-weight:600; }
.t.span { box-shadow:inset 0 0 0 1.5px var(--span); }
.t.sp { color:var(--mute); font-size:11px; font-family:ui-monospace,monospace; }
.t.e { padding:1px 2px; }
.t .nl { color:#98a2b3; font-style:normal; }
.sw { display:inline-block; padding:0 5px; border-radius:3px; background:#fff; color:var(--ink); }
.sw.flagged { border-bottom:2.5px solid var(--flag); font-weight:600; }
.sw.span { box-shadow:inset 0 0 0 1.5px var(--span); }
.moves { margin-top:9px; display:flex; flex-wrap:wrap; gap:4px 6px; align-items:baseline; font-size:12.5px; }
.mv { border:1px solid var(--line); border-radius:6px; padding:0 6px; background:#fafbfc;
  font-variant-numeric:tabular-nums; white-space:nowrap; }
.mv .tk { font-weight:600; white-space:pre; }
.down { color:#1d4ed8; } .up { color:#c2410c; }
.empty { color:var(--mute); padding:30px 0; text-align:center; }
#tip { position:fixed; z-index:10; pointer-events:none; display:none; background:#111827; color:#f9fafb;
  padding:7px 10px; border-radius:7px; font-size:12.5px; line-height:1.45; max-width:340px;
  box-shadow:0 6px 20px rgba(0,0,0,.25); font-variant-numeric:tabular-nums; }
#tip table { border-collapse:collapse; } #tip td { padding:0 10px 0 0; } #tip td + td { text-align:right; }
#tip .tt { font-weight:650; white-space:pre; }
#tip .note { color:#fbbf24; }
"""

CORE_JS = r"""
const D = JSON.parse(document.getElementById('cut-data').textContent);
const $ = s => document.querySelector(s);
function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
}
function fmtNum(x, d = 3) { return x == null || Number.isNaN(x) ? '–' : (x >= 0 ? '+' : '−') + Math.abs(x).toFixed(d); }
function fmtP(p) {
  if (p == null) return '–';
  if (p >= 0.001) return p.toPrecision(3);
  return p.toExponential(1).replace('e-', 'e−');
}
// diverging scale: negative -> blue, 0 -> white, positive -> red, |v| >= max saturates
const NEG = [49, 110, 190], POS = [214, 64, 44];
function diverging(v, max) {
  if (v == null || Number.isNaN(v)) return 'transparent';
  const x = Math.max(-1, Math.min(1, v / max)), a = Math.pow(Math.abs(x), 0.75) * 0.78;
  const c = x < 0 ? NEG : POS;
  return `rgb(${c.map(k => Math.round(255 + (k - 255) * a)).join(',')})`;
}
function colourBar(max) {
  const stops = [-1, -0.5, -0.25, 0, 0.25, 0.5, 1].map(x => diverging(x * max, max));
  return `<i style="background:linear-gradient(90deg,${stops.join(',')})"></i>`;
}

let state = null, DEFAULTS = null, ORDER = [];  // set up by setup(), once VIEW is defined

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  for (const [k, v] of h) {
    if (!(k in DEFAULTS)) continue;
    state[k] = typeof DEFAULTS[k] === 'number' ? (Number.isFinite(+v) ? +v : DEFAULTS[k]) : v;
  }
  if (!VIEW.sorts.some(s => s.key === state.sort)) state.sort = DEFAULTS.sort;
  if (!h.has('dir')) state.dir = sortDir(state.sort);
}
function sortDir(key) { return VIEW.sorts.find(s => s.key === key).dir; }
function writeHash() {
  const h = new URLSearchParams();
  for (const k in state) {
    const dflt = k === 'dir' ? sortDir(state.sort) : DEFAULTS[k];  // a sort's own direction goes unsaid
    if (state[k] !== dflt) h.set(k, state[k]);
  }
  const s = h.toString();
  history.replaceState(null, '', s ? '#' + s : location.pathname + location.search);
}
function cmp(a, b) {
  if (a == null || Number.isNaN(a)) return (b == null || Number.isNaN(b)) ? 0 : 1;
  if (b == null || Number.isNaN(b)) return -1;
  return a < b ? -1 : a > b ? 1 : 0;
}
function apply() {
  if (VIEW.refresh) VIEW.refresh(state);
  const q = state.q.toLowerCase().trim();
  const sort = VIEW.sorts.find(s => s.key === state.sort);
  const sign = state.dir === 'desc' ? -1 : 1;
  const rows = [];
  D.records.forEach((r, k) => { if (!q || r._hay.includes(q)) rows.push(k); });
  const val = k => sort.value(D.records[k]);
  rows.sort((a, b) => {
    const va = val(a), vb = val(b);
    const nulls = (va == null) - (vb == null);
    return nulls || sign * cmp(va, vb) || a - b;
  });
  ORDER = rows;
}
function render() {
  const per = D.per_page, pages = Math.max(1, Math.ceil(ORDER.length / per));
  state.page = Math.min(Math.max(1, Math.round(state.page)), pages);
  const start = (state.page - 1) * per, shown = ORDER.slice(start, start + per);
  $('#cards').innerHTML = shown.length
    ? shown.map(k => VIEW.card(D.records[k], k, state)).join('')
    : '<div class="empty">No record matches the filter.</div>';
  $('#legend').innerHTML = VIEW.legend ? VIEW.legend(state) : '';
  const n = ORDER.length;
  $('#count').textContent = n ? `${start + 1}–${start + shown.length} of ${n}` + (n < D.records.length ? ` (filtered from ${D.records.length})` : '') : `0 of ${D.records.length}`;
  $('#pageno').value = state.page; $('#pageno').max = pages; $('#pages').textContent = pages;
  $('#prev').disabled = state.page <= 1; $('#next').disabled = state.page >= pages;
  $('#dir').textContent = state.dir === 'desc' ? '↓ desc' : '↑ asc';
  writeHash();
}
function update(resetPage = true) { if (resetPage) state.page = 1; apply(); render(); }

function setup() {
  state = Object.assign({q: '', sort: VIEW.sorts[0].key, dir: VIEW.sorts[0].dir, page: 1}, VIEW.state || {});
  DEFAULTS = Object.assign({}, state);
  readHash();
  D.records.forEach(r => VIEW.prepare && VIEW.prepare(r));
  $('#sort').innerHTML = VIEW.sorts.map(s => `<option value="${s.key}">${esc(s.label)}</option>`).join('');
  $('#sort').value = state.sort; $('#q').value = state.q;
  $('#viewctl').innerHTML = VIEW.controls ? VIEW.controls(state) : '';
  if (VIEW.bind) VIEW.bind(state, update);
  let timer = null;
  $('#q').addEventListener('input', e => { clearTimeout(timer); timer = setTimeout(() => { state.q = e.target.value; update(); }, 150); });
  $('#sort').addEventListener('change', e => {
    state.sort = e.target.value; state.dir = sortDir(state.sort); update();
  });
  $('#dir').addEventListener('click', () => { state.dir = state.dir === 'desc' ? 'asc' : 'desc'; update(); });
  $('#prev').addEventListener('click', () => { state.page--; render(); scrollTo(0, 0); });
  $('#next').addEventListener('click', () => { state.page++; render(); scrollTo(0, 0); });
  $('#pageno').addEventListener('change', e => { state.page = +e.target.value || 1; render(); });
  const tip = $('#tip');
  document.addEventListener('mouseover', e => {
    const t = e.target.closest && e.target.closest('.t[data-i]'), card = t && t.closest('[data-r]');
    if (!card) { tip.style.display = 'none'; return; }
    tip.innerHTML = VIEW.tip(D.records[+card.dataset.r], +t.dataset.i, state);
    tip.style.display = 'block';
  });
  document.addEventListener('mousemove', e => {
    if (tip.style.display !== 'block') return;
    const w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(e.clientX + 14, innerWidth - w - 8) + 'px';
    tip.style.top = (e.clientY + 18 + h > innerHeight ? e.clientY - h - 12 : e.clientY + 18) + 'px';
  });
  apply(); render();
  document.body.dataset.ready = '1';
}
"""

SHELL = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head><body>
<header class="top"><h1>{title}</h1><div class="sub">{subtitle}</div>
<div class="summary">{summary}</div>{figures}</header>
<div class="bar">
 <label>filter <input id="q" type="search" placeholder="instruction, judgment, response"></label>
 <label>sort <select id="sort"></select></label><button id="dir" type="button"></button>
 <span id="viewctl"></span>
 <span class="pager"><span class="count" id="count"></span>
  <button id="prev" type="button" aria-label="previous page">‹</button>
  page <input id="pageno" type="number" min="1" value="1"> / <span id="pages">1</span>
  <button id="next" type="button" aria-label="next page">›</button></span>
</div>
<div id="legend"></div>
<main id="cards"></main>
<div id="tip"></div>
<script type="application/json" id="cut-data">{data}</script>
<script>{core_js}
{view_js}
setup();</script>
</body></html>
"""


def esc(text: Any) -> str:
    """HTML-escape for text and attribute values."""
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


def embed_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no '<' can close it early."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_page(
    title: str,
    records: list[dict],
    view_js: str,
    subtitle: str = "",
    summary: list[tuple[str, str]] = (),
    figures: list[tuple[str, bytes]] = (),
    extra: dict | None = None,
    per_page: int = 50,
    view_css: str = "",
) -> str:
    """The page: `records` (a list of JSON objects the view's script reads as D.records), `extra`
    (more keys of D), a header with `summary` chips and `figures` (PNG bytes, inlined)."""
    chips = "".join(f'<span class="chip">{esc(k)} <b>{esc(v)}</b></span>' for k, v in summary)
    figs = "".join(
        f'<details class="fig"><summary>{esc(name)}</summary><img alt="{esc(name)}" src="{png_data_uri(png)}">'
        "</details>"
        for name, png in figures
    )
    data = {**(extra or {}), "records": records, "per_page": per_page}
    return SHELL.format(
        title=esc(title),
        subtitle=esc(subtitle),
        summary=chips,
        figures=figs,
        css=CSS + view_css,
        data=embed_json(data),
        view_js=view_js,
        core_js=CORE_JS,
    )
