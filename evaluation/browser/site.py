"""The browser as a static site that works from file:// (no server, no fetch): data files are
scripts that hand their content to the page (`SAE.load(key, data)`), added on demand.

    browser/index.html                 one row per member (architecture, knob, L0, FVU, CE recovered, dead)
    browser/member.html?m=NAME         its latents: a sortable, filterable table and the density histogram;
                                       member.html?m=NAME#latent=I opens latent I's card (each latent is a
                                       link to that address: shareable, opens in a new tab)
    browser/data/index.js              the members
    browser/data/NAME/summary.js       per latent: density, max, mean when active (and r for a crosscoder)
    browser/data/NAME/shard_N.js       the cards of latents N·shard … (N+1)·shard − 1, with the token strings they use
    browser/app.js, style.css          the pages' code

Sizes: index and member pages stay small whatever the width; a card's data (20 contexts and 5
bands of samples, 17 tokens each) is a few KB, loaded with its shard.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from evaluation.browser.collect import HALF, bin_edges
from evaluation.browser.logit_effects import UNIT

VISIBLE = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})  # a token's line breaks and tabs, as marks in one line


def write_site(target: Path, data: list, summary: dict, store, decode, shard: int, about: dict) -> None:
    (target / "data").mkdir(parents=True, exist_ok=True)
    members = []
    for d in data:
        members.append(_member_row(d))
        directory = target / "data" / d.row["name"]
        directory.mkdir(exist_ok=True)
        rec = d.recorder
        latents = {"density": _rounded(rec.density()), "max": _rounded(rec.max), "mean": _rounded(rec.mean_active())}
        if "r" in d.extra:
            latents["r"] = _rounded(d.extra["r"])
        _script(directory / "summary.js", f"{d.row['name']}/summary",
                {"name": d.row["name"], "n": rec.F, "shard": shard, "latents": latents, "extra": _about_extra(d.extra)})
        bands = rec.bands()
        for first in range(0, rec.F, shard):
            _script(directory / f"shard_{first // shard}.js", f"{d.row['name']}/shard_{first // shard}",
                    _shard(d, first, min(first + shard, rec.F), bands, decode))
    _script(target / "data" / "index.js", "index",
            {"members": members, "store": summary["store"].get("path"), "hook": summary["store"].get("hook"),
             "rows": about["rows"], "split": about["split"], "note": about.get("logits_note"),
             "bins": bin_edges(), "half": HALF, "logit_unit": UNIT})
    for name, text in (("index.html", _page("index")), ("member.html", _page("member")), ("app.js", APP_JS),
                       ("style.css", STYLE)):
        (target / name).write_text(text)


def visible(text: str) -> str:
    """A token's text as a context shows it: line breaks and tabs as marks (↵ ␍ ⇥), so that an
    example stays one line of tokens."""
    return text.translate(VISIBLE)


def _member_row(d) -> dict:
    r = d.row
    keys = ("name", "arch", "k", "l1_coeff", "l0_coeff", "d_sae", "l0", "fvu", "ce_recovered", "ce_recovered_mean_ablation",
            "dead_fraction")
    return {k: r.get(k) for k in keys if r.get(k) is not None}


def _shard(d, first: int, last: int, bands: list[list[dict]], decode) -> dict:
    """The cards of latents first … last − 1 and the token strings they use, each tensor turned
    into lists once for the whole shard (a 65,536-latent member has 256 shards)."""
    rec, rows = d.recorder, slice(first, last)
    top, sample = _examples(rec.top, rows), _examples(rec.sample, rows)
    stats = {"density": _rounded(rec.density()[rows]), "max": _rounded(rec.max[rows]), "mean": _rounded(rec.mean_active()[rows])}
    hist = rec.hist[rows].tolist()
    used = [rec.top.tokens[rows], rec.sample.tokens[rows]]
    cards = []
    for n, i in enumerate(range(first, last)):
        cards.append({"i": i, **{k: v[n] for k, v in stats.items()}, "top": [e for e in top[n] if e is not None],
                      "hist": hist[n], "bands": [{"lo": _r(b["lo"]), "hi": _r(b["hi"]), "samples": [sample[n][j] for j in b["samples"]]}
                                                 for b in bands[i]]})
    if d.logits is not None:
        pos_ids, pos_values, neg_ids, neg_values = (t[rows] for t in d.logits)
        used += [pos_ids, neg_ids]
        for card, *effects in zip(cards, pos_ids.tolist(), _rounded(pos_values), neg_ids.tolist(), _rounded(neg_values)):
            card["logits"] = {"pos": [list(p) for p in zip(effects[0], effects[1])], "neg": [list(p) for p in zip(effects[2], effects[3])]}
    if "norms" in d.extra:
        for card, norms in zip(cards, _rounded(d.extra["norms"][rows])):
            card["norms"] = norms
    ids = torch.cat([u.reshape(-1).long() for u in used]).unique().tolist()
    return {"first": first, "cards": cards, "vocab": {t: visible(decode(t)) for t in ids if t >= 0}}


def _examples(slots, rows: slice) -> list[list[list | None]]:
    """Per latent of `rows`, per slot: [value, sequence, position, token ids, activations], or
    None for an empty slot."""
    value, acts = _rounded(slots.value[rows]), _rounded(slots.acts[rows])
    filled = torch.isfinite(slots.value[rows]).tolist()
    where, tokens = slots.where[rows].tolist(), slots.tokens[rows].tolist()
    return [[[value[i][j], *where[i][j], tokens[i][j], acts[i][j]] if filled[i][j] else None for j in range(len(filled[i]))]
            for i in range(len(filled))]


def _about_extra(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}


def _script(path: Path, key: str, payload: dict) -> None:
    path.write_text(f"SAE.load({json.dumps(key)}, {json.dumps(payload, separators=(',', ':'))});\n")


_POWERS = torch.tensor([10.0 ** k for k in range(23)], dtype=torch.float64)  # exact in float64


def _rounded(t: torch.Tensor) -> list:
    """`t` to 4 significant digits as nested lists of floats that print short (0.1234, not
    0.12340000000000001): rounded in float64 by an exact power of ten; non-finite values as 0."""
    x = t.double()
    finite = torch.isfinite(x) & (x != 0)
    e = torch.where(finite, torch.floor(torch.log10(x.abs().where(finite, 1.0))), 0.0).long()
    up = (3 - e).clamp(0, 22)  # digits after the point: x · 10^up, rounded, / 10^up
    down = (e - 3).clamp(0, 22)  # large values: x / 10^down, rounded, · 10^down
    r = torch.round(x * _POWERS[up] / _POWERS[down]) / _POWERS[up] * _POWERS[down]
    return torch.where(finite, r, 0.0).tolist()


def _r(v: float) -> float:
    return float(f"{v:.4g}") if math.isfinite(v) else 0.0


def _page(kind: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sae-sweep browser</title><link rel="stylesheet" href="style.css"></head>
<body data-page="{kind}"><main id="main">loading…</main>
<script src="app.js"></script></body></html>
"""


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}th,td{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
tr.latent:hover{background:#fff3e0;cursor:pointer}.tok{white-space:pre;border-radius:2px;font-family:monospace}
.peak{outline:1px solid #e65100}.ctx{display:block;margin:2px 0;padding:2px 0;border-bottom:1px solid #f3f3f3}
.score{display:inline-block;min-width:13em;color:#888}.card{border:1px solid #ddd;padding:1em;margin:1em 0;max-width:70em}
.cols{display:flex;gap:2em;flex-wrap:wrap}.muted{color:#888}svg{background:#fafafa}input{margin:0 1em 0 .3em}
"""


APP_JS = r"""
const SAE = {waiting: {}, data: {},
  load(key, payload) { this.data[key] = payload; (this.waiting[key] || []).forEach(f => f(payload)); delete this.waiting[key]; },
  need(key) {  // a data file, by adding its script (file:// allows scripts, not fetch)
    if (this.data[key]) return Promise.resolve(this.data[key]);
    return new Promise(resolve => {
      (this.waiting[key] = this.waiting[key] || []).push(resolve);
      if (this.waiting[key].length === 1) {
        const s = document.createElement('script'); s.src = 'data/' + key + '.js'; document.body.appendChild(s);
      }
    });
  }};
const fmt = v => v === undefined || v === null ? '-' : (Math.abs(v) >= 1000 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : (+v).toPrecision(3));
const pct = v => typeof v === 'number' ? (100 * v).toFixed(1) + '%' : '-';
const latentUrl = (name, i) => `member.html?m=${encodeURIComponent(name)}#latent=${i}`;
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'})[c]);
const main = () => document.getElementById('main');

function histogram(values, width = 420, height = 110, label = '') {
  const max = Math.max(1, ...values), w = width / values.length;
  const bars = values.map((v, i) => `<rect x="${i * w}" y="${height - 14 - v / max * (height - 20)}" width="${w - 1}" height="${v / max * (height - 20)}" fill="#fb8c00"><title>${v}</title></rect>`).join('');
  return `<svg width="${width}" height="${height}">${bars}<text x="2" y="${height - 2}" font-size="10">${esc(label)}</text></svg>`;
}

async function indexPage() {
  const idx = await SAE.need('index');
  const cols = ['name', 'arch', 'k', 'l1_coeff', 'l0_coeff', 'l0', 'fvu', 'ce_recovered', 'ce_recovered_mean_ablation', 'dead_fraction'];
  const head = {name: 'member', ce_recovered: 'CE rec. (zero abl.)', ce_recovered_mean_ablation: 'CE rec. (mean abl.)', dead_fraction: 'dead', l0_coeff: 'λ_L0', l1_coeff: 'λ'};
  const shown = cols.filter(c => idx.members.some(m => m[c] !== undefined));
  main().innerHTML = `<h1>Members</h1><p class="muted">${idx.members.length} members of ${esc(idx.store)} (${esc(idx.hook)}); latents from ${idx.rows.toLocaleString()} ${idx.split} rows.${idx.note ? ' ' + esc(idx.note) : ''}</p>
  <table id="members"><tr>${shown.map(c => `<th>${head[c] || c}</th>`).join('')}</tr>${idx.members.map(m => `<tr>${shown.map(c =>
    `<td>${c === 'name' ? `<a href="member.html?m=${encodeURIComponent(m.name)}">${esc(m.name)}</a>` : (c === 'dead_fraction' ? pct(m[c]) : typeof m[c] === 'number' ? fmt(m[c]) : esc(m[c] ?? '-'))}</td>`).join('')}</tr>`).join('')}</table>`;
}

async function memberPage() {
  const name = new URLSearchParams(location.search).get('m');
  const [idx, s] = [await SAE.need('index'), await SAE.need(name + '/summary')];
  const L = s.latents, n = s.n, cols = ['density', 'max', 'mean'].concat(L.r ? ['r'] : []);
  let order = [...Array(n).keys()], key = null, desc = true, shown = 200;
  const logd = L.density.map(d => d > 0 ? Math.log10(d) : null), bins = Array(25).fill(0), dead = logd.filter(v => v === null).length;
  logd.forEach(v => bins[v === null ? 0 : Math.min(24, 1 + Math.floor((v + 8) * 3))]++);
  main().innerHTML = `<p><a href="index.html">← members</a></p><h1>${esc(name)}</h1>
    <p class="muted" id="subtitle">${[`${n.toLocaleString()} latents`, `${pct(dead / n)} dead (never fired in the ${idx.rows.toLocaleString()} ${idx.split} rows)`,
      ...(s.extra.input_hooks ? ['reads ' + esc(s.extra.input_hooks.join(', ')), 'writes ' + esc(s.extra.output_hooks.join(', '))] : [])].join('; ')}</p>
    <div>${histogram(bins, 500, 120, 'log10 density: first bar = dead (never fired), then −8 … 0')}</div>
    <div id="card"></div>
    <p>density ≥ <input id="mind" size="6" value="0"> latent <input id="find" size="6" placeholder="index"></p>
    <table id="latents"></table><p><button id="more">more</button></p>`;
  const table = document.getElementById('latents');
  function render() {
    const minD = parseFloat(document.getElementById('mind').value) || 0, find = document.getElementById('find').value.trim();
    const rows = order.filter(i => L.density[i] >= minD && (find === '' || String(i) === find)).slice(0, shown);
    table.innerHTML = `<tr><th data-k="i">latent</th>${cols.map(c => `<th data-k="${c}">${c}${key === c ? (desc ? ' ▼' : ' ▲') : ''}</th>`).join('')}</tr>` +
      rows.map(i => `<tr class="latent" data-i="${i}"><td><a href="${latentUrl(name, i)}">${i}</a></td>${cols.map(c => `<td>${fmt(L[c][i])}</td>`).join('')}</tr>`).join('');
    table.querySelectorAll('th').forEach(th => th.onclick = () => {
      const k = th.dataset.k; desc = key === k ? !desc : true; key = k;
      order.sort((a, b) => k === 'i' ? (desc ? b - a : a - b) : (desc ? L[k][b] - L[k][a] || a - b : L[k][a] - L[k][b] || a - b)); render(); });
    table.querySelectorAll('tr.latent').forEach(tr => tr.onclick = e => { if (!e.target.closest('a')) location.hash = 'latent=' + tr.dataset.i; });
  }
  document.getElementById('mind').oninput = render; document.getElementById('find').oninput = render;
  document.getElementById('more').onclick = () => { shown += 500; render(); };
  render();
  const open = async () => { const m = location.hash.match(/latent=(\d+)/); if (m) await card(name, s, idx, +m[1]); };
  window.onhashchange = open; open();
}

function context(ex, vocab, max, half) {
  const [value, seq, pos, tokens, acts] = ex;
  return `<div class="ctx" data-value="${value}"><span class="score">${fmt(value)} (sequence ${seq})</span>` + tokens.map((t, j) => t < 0 ? '' :
    `<span class="tok${j === half ? ' peak' : ''}" title="${fmt(acts[j])}" data-act="${acts[j]}" style="background:rgba(251,140,0,${max > 0 ? Math.max(0, acts[j]) / max : 0})">${esc(vocab[t] ?? '#' + t)}</span>`).join('') + '</div>';
}

async function card(name, s, idx, i) {
  const shard = await SAE.need(`${name}/shard_${Math.floor(i / s.shard)}`), c = shard.cards[i - shard.first], V = shard.vocab;
  const effects = (title, list) => `<div><h3>${title}</h3>${list.map(([t, v]) => `<div><span class="tok">${esc(V[t])}</span> ${v > 0 ? '+' : ''}${fmt(v)}</div>`).join('')}</div>`;
  const logits = c.logits ? `<div><div class="cols">${effects('promotes', c.logits.pos)}${effects('suppresses', c.logits.neg)}</div>
    <p class="muted" id="logit-unit">${esc(idx.logit_unit)}</p></div>` : `<p class="muted">${esc(idx.note || 'no logit effects for this hook')}</p>`;
  const nonzero = c.hist.map((v, b) => [b, v]).filter(([b, v]) => v > 0), b0 = nonzero.length ? nonzero[0][0] : 0, b1 = nonzero.length ? nonzero[nonzero.length - 1][0] : 0;
  document.getElementById('card').innerHTML = `<div class="card" id="latent-card" data-latent="${i}"><h2><a href="${latentUrl(name, i)}">latent ${i}</a></h2>
    <p>density ${fmt(c.density)}, max ${fmt(c.max)}, mean when active ${fmt(c.mean)}${c.norms ? ', decoder norm per source ' + c.norms.map(fmt).join(' / ') : ''}</p>
    <div class="cols"><div>${histogram(c.hist.slice(b0, b1 + 1), 300, 100, `activations, 2^${b0 - 20} … 2^${b1 - 19}`)}</div>${logits}</div>
    <h3>top activations</h3><div id="top">${c.top.map(ex => context(ex, V, c.max, idx.half)).join('')}</div>
    ${c.bands.map((b, k) => `<h3>band ${k + 1}: ${fmt(b.lo)} … ${fmt(b.hi)}</h3>` + (b.samples.map(ex => context(ex, V, c.max, idx.half)).join('') || '<p class="muted">no sample</p>')).join('')}</div>`;
  document.getElementById('card').scrollIntoView();
}

(document.body.dataset.page === 'index' ? indexPage : memberPage)();
"""
