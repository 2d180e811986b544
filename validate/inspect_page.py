"""The inspect page: one self-contained HTML file (inline style and script, no network: a Content-Security-Policy
forbids every fetch) that shows what the cache keeps, opened straight from disk.

Sections: the settings and the bytes held; a bar per layer (tokens kept, plan's budget); a layer x position map of
how many heads keep each token (a canvas drawn from the embedded counts, positions binned to at most MAX_COLUMNS
columns, the text on hover); the marked span and the layers and heads that keep or drop it; the prompt's text, each
token shaded by the share of (layer, head) pairs that keep it, sinks and window marked. The DOM stays one span per
token whatever the prompt's length, and the per-token data is one base64 array, so an 8k-token page loads at once.
"""

from __future__ import annotations

import base64
import html
import json
import math

import numpy as np

from exporter.plan import human_bytes
from validate.inspect_data import InspectData

DENSE = ' class="dense"'  # many layers: thinner bars
MAX_COLUMNS = 1024  # map columns at most: longer prompts are binned
LEVELS = 10  # shades of the prompt's tokens (share of pairs keeping them, in tenths)
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def bin_size(prompt_len: int) -> int:
    """Positions per map column."""
    return max(1, math.ceil(prompt_len / MAX_COLUMNS))


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _visible(text: str) -> str:
    """A token's text for the page: control characters other than newline and tab shown as escapes."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else c.encode("unicode_escape").decode()
                   for c in text)


def _header(d: InspectData) -> str:
    ratio = d.kv_bytes_held / d.kv_bytes_full
    settings = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in d.hyperparameters.items())
    notes = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_visible(v))}</td></tr>" for k, v in d.notes.items())
    answer = "" if d.answer is None else f"<tr><th>answer</th><td class='answer'>{_esc(_visible(d.answer))}</td></tr>"
    always = []
    if d.sinks:
        always.append(f"the first {d.sinks} tokens (sinks)")
    if d.window:
        always.append(f"the last {d.window} tokens (window)")
    return f"""<header>
<h1>What the cache keeps: <code>{_esc(d.policy)}</code> on <code>{_esc(d.model)}</code></h1>
<table class="facts" id="facts">
<tr><th>engine</th><td>{_esc(d.engine)}</td></tr>
<tr><th>prompt</th><td>{d.prompt_len} tokens; {d.num_layers} layers x {d.num_heads} cache heads</td></tr>
<tr><th>KV held</th><td id="kv-bytes">{human_bytes(d.kv_bytes_held)} of FullKV's {human_bytes(d.kv_bytes_full)}
({100 * ratio:.1f} %, {d.dtype}); the kept pairs alone: {human_bytes(d.kv_bytes_kept)}</td></tr>
<tr><th>always kept</th><td>{_esc(", ".join(always) or "nothing by position")}</td></tr>
{answer}{notes}</table>
<details><summary>settings of {_esc(d.policy)}</summary><table class="facts">{settings or "<tr><td>none</td></tr>"}
</table></details>
</header>"""


def _budgets(d: InspectData) -> str:
    rows = []
    q = max(1, d.prompt_len)
    for layer, heads in enumerate(d.kept):
        sizes = [len(p) for p in heads]
        mean = sum(sizes) / max(1, len(sizes))
        spread = f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else f"{sizes[0]}"
        planned = d.planned[layer]
        rows.append(
            f'<div class="budget" data-layer="{layer}" data-kept="{mean:.1f}" data-planned="{planned}">'
            f'<span class="lab">L{layer}</span><span class="track">'
            f'<span class="bar" style="width:{100 * mean / q:.2f}%"></span>'
            f'<span class="plan" style="left:{100 * min(planned, q) / q:.2f}%" title="plan: {planned}"></span>'
            f'</span><span class="num">{spread} of {d.prompt_len} kept (plan {planned})</span></div>')
    return (f'<section><h2>Per-layer budgets</h2><p class="hint">Tokens each layer keeps per head (bar: the mean over '
            f'heads; a range where heads differ); the tick is what <code>pkv-export plan</code> budgets.</p>'
            f'<div id="budgets"{DENSE if d.num_layers > 16 else ""}>{"".join(rows)}</div></section>')


def _mark_report(d: InspectData) -> str:
    if d.mark is None:
        return ""
    m, per = d.mark, d.mark_heads()
    n = m.token_end - m.token_start
    whole = sum(k == n for layer in per for k in layer)
    none = sum(k == 0 for layer in per for k in layer)
    pairs = d.num_layers * d.num_heads
    rows = []
    for layer, heads in enumerate(per):
        cells = []
        for h, k in enumerate(heads):
            state = "whole" if k == n else "none" if k == 0 else "part"
            cells.append(f'<span class="head {state}">h{h} {k}/{n}{_score_note(d, layer, h)}</span>')
        kept = sum(k == n for k in heads)
        dropped = sum(k == 0 for k in heads)
        rows.append(f'<tr data-layer="{layer}"><th>L{layer}</th><td>{kept}</td><td>{len(heads) - kept - dropped}</td>'
                    f'<td>{dropped}</td><td>{"".join(cells)}</td></tr>')
    again = f" (the first of {m.occurrences} occurrences)" if m.occurrences > 1 else ""
    return f"""<section id="mark-report"><h2>The marked span</h2>
<p>Tokens {m.token_start}-{m.token_end - 1} ({n} tokens){again}: <q class="marktext">{_esc(_visible(m.text))}</q></p>
<p class="verdict" id="mark-verdict" data-whole="{whole}" data-none="{none}" data-pairs="{pairs}">Kept whole by
{whole} of {pairs} (layer, head) pairs, in part by {pairs - whole - none}, dropped by {none}.</p>
<table class="marks"><tr><th>layer</th><th>heads keeping it whole</th><th>in part</th><th>dropping it</th>
<th>per head: its tokens kept{"; its best score vs the lowest kept score" if d.scores else ""}</th></tr>
{"".join(rows)}</table></section>"""


def _score_note(d: InspectData, layer: int, head: int) -> str:
    """`best < cut`: the marked span's best score against the lowest score the head kept (why it was dropped)."""
    if not d.scores or d.scores[layer] is None or d.mark is None:
        return ""
    row = d.scores[layer][head]
    span = row[d.mark.token_start : d.mark.token_end]
    kept = row[d.kept[layer][head]]
    span, kept = span[np.isfinite(span)], kept[np.isfinite(kept)]
    if not len(span) or not len(kept):
        return ""
    best, cut = float(span.max()), float(kept.min())
    return f" ({best:.3g} {'&lt;' if best < cut else '&ge;'} {cut:.3g})"


def _prompt(d: InspectData, share: np.ndarray) -> str:
    parts = []
    m = d.mark
    for i, text in enumerate(d.tokens):
        if m is not None and i == m.token_start:
            parts.append('<span id="mark" class="mark">')
        cls = f"t s{min(LEVELS, int(share[i] * LEVELS + 1e-9))}"
        if i < d.sinks:
            cls += " sink"
        if i >= d.prompt_len - d.window:
            cls += " win"
        parts.append(f'<span class="{cls}">{_esc(_visible(text))}</span>')
        if m is not None and i == m.token_end - 1:
            parts.append("</span>")
    return (f'<section><h2>The prompt</h2><p class="hint">Each token shaded by the share of (layer, head) pairs that '
            f'keep it: <span class="t s0">none</span> <span class="t s3">30 %</span> <span class="t s6">60 %</span> '
            f'<span class="t s10">all</span>; <span class="t sink">sinks</span>, <span class="t win">window</span>, '
            f'<span class="mark">marked span</span>. Hover a token for its layers.</p>'
            f'<div id="prompt">{"".join(parts)}</div></section>')


def _data(d: InspectData, counts: np.ndarray) -> str:
    payload = {"layers": d.num_layers, "heads": d.num_heads, "q": d.prompt_len, "bin": bin_size(d.prompt_len),
               "sinks": d.sinks, "window": d.window,
               "mark": None if d.mark is None else [d.mark.token_start, d.mark.token_end],
               "counts": base64.b64encode(np.ascontiguousarray(counts, np.uint8).tobytes()).decode("ascii")}
    return json.dumps(payload).replace("</", "<\\/")


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222;max-width:1200px}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}code{font-size:.95em}
.facts th{text-align:left;padding-right:1em;vertical-align:top;color:#555;font-weight:600}
.answer{font-family:monospace;white-space:pre-wrap}
.hint{color:#555;font-size:.9em}
.budget{display:flex;align-items:center;gap:.6em;height:16px;margin:2px 0;font-size:12px}
.budget .lab{width:3.5em;text-align:right;color:#555}
.track{position:relative;flex:0 0 55%;height:12px;background:#eef1f5;border-radius:2px}
.bar{position:absolute;left:0;top:0;bottom:0;background:#2166ac;border-radius:2px}
.plan{position:absolute;top:-2px;bottom:-2px;width:2px;background:#d6604d}
.num{color:#444}
.dense .budget{height:11px;margin:1px 0;font-size:10px}.dense .track{height:8px}
#mapbox{position:relative;overflow-x:auto}
#map{image-rendering:pixelated;border:1px solid #ccc;cursor:crosshair}
#tip{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #888;padding:4px 7px;
 font-size:12px;max-width:420px;white-space:pre-wrap;box-shadow:0 2px 6px rgba(0,0,0,.2);z-index:5}
#prompt{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;word-break:break-all;line-height:1.6;
 border:1px solid #ddd;padding:.6em;max-height:70vh;overflow-y:auto}
.t{border-radius:2px}
.s0{background:#fff}.s1{background:#eaf1f8}.s2{background:#d5e4f1}.s3{background:#bfd6ea}.s4{background:#a6c6e1}
.s5{background:#8bb5d8}.s6{background:#6fa2cc}.s7{background:#548fc0;color:#fff}.s8{background:#3b7cb3;color:#fff}
.s9{background:#2a69a3;color:#fff}.s10{background:#1b5690;color:#fff}
.sink{box-shadow:inset 0 3px 0 #e08214}.win{box-shadow:inset 0 -3px 0 #1a9850}
.mark{outline:2px solid #d7191c;outline-offset:1px;border-radius:2px}
.marks td,.marks th{padding:2px 8px;text-align:left;font-size:12px;vertical-align:top}
.head{display:inline-block;margin:1px 3px;padding:0 4px;border-radius:3px;font-family:monospace}
.head.whole{background:#d9f0d3}.head.part{background:#fee8c8}.head.none{background:#fbb4b9}
.verdict{font-weight:600}
.legend span{display:inline-block;width:14px;height:10px;margin:0 2px 0 8px;vertical-align:middle}
"""

SCRIPT = """
(function(){
const D=JSON.parse(document.getElementById('inspect-data').textContent);
const raw=atob(D.counts);const C=new Uint8Array(raw.length);
for(let i=0;i<raw.length;i++)C[i]=raw.charCodeAt(i);
const L=D.layers,H=Math.max(1,D.heads),Q=D.q,B=D.bin,cols=Math.ceil(Q/B);
const tokens=Array.from(document.querySelectorAll('#prompt .t'));
const tip=document.getElementById('tip');
function show(e,text){tip.textContent=text;tip.style.display='block';
 tip.style.left=Math.min(e.clientX+14,window.innerWidth-440)+'px';tip.style.top=(e.clientY+14)+'px';}
function hide(){tip.style.display='none';}
function shade(v){const a=[255,255,255],b=[27,86,144];
 return 'rgb('+a.map((x,i)=>Math.round(x+(b[i]-x)*v)).join(',')+')';}
const cw=Math.max(1,Math.min(8,Math.floor(1100/cols))),ch=Math.max(4,Math.min(16,Math.floor(360/Math.max(1,L))));
const strip=10,axis=16,gut=36,canvas=document.getElementById('map');
canvas.width=gut+cols*cw;canvas.height=L*ch+strip+axis;
const g=canvas.getContext('2d');
g.fillStyle='#fff';g.fillRect(0,0,canvas.width,canvas.height);
g.font='10px sans-serif';g.fillStyle='#555';g.textBaseline='middle';
const every=Math.max(1,Math.ceil(11/ch));
for(let l=0;l<L;l+=every)g.fillText('L'+l,2,l*ch+ch/2);
g.textBaseline='top';
for(let k=0;k<=4;k++){const p=Math.min(Q-1,Math.round(k*(Q-1)/4)),x=gut+Math.floor(p/B)*cw;
 g.fillText(String(p),Math.min(x,canvas.width-30),L*ch+strip+3);}
const mean=new Float32Array(L*cols);
for(let l=0;l<L;l++){for(let c=0;c<cols;c++){let s=0,n=0;
 for(let p=c*B;p<Math.min(Q,(c+1)*B);p++){s+=C[l*Q+p];n++;}
 mean[l*cols+c]=n?s/n/H:0;g.fillStyle=shade(mean[l*cols+c]);g.fillRect(gut+c*cw,l*ch,cw,ch);}}
function span(from,to){const x0=Math.floor(from/B)*cw,x1=Math.ceil(to/B)*cw;return [gut+x0,Math.max(cw,x1-x0)];}
function band(from,to,color){if(to<=from)return;g.fillStyle=color;const s=span(from,to);
 g.fillRect(s[0],L*ch+2,s[1],strip-3);}
band(0,D.sinks,'#e08214');band(Q-D.window,Q,'#1a9850');
if(D.mark){band(D.mark[0],D.mark[1],'#d7191c');g.strokeStyle='#d7191c';g.lineWidth=2;
 const s=span(D.mark[0],D.mark[1]);g.strokeRect(s[0]+1,1,s[1]-2,L*ch-2);}
function snippet(a,b){let s='';for(let p=a;p<b&&s.length<160;p++)s+=tokens[p]?tokens[p].textContent:'';
 return s.length>=160?s.slice(0,160)+'...':s;}
canvas.addEventListener('mousemove',e=>{const r=canvas.getBoundingClientRect();
 const x=(e.clientX-r.left)*canvas.width/r.width,y=(e.clientY-r.top)*canvas.height/r.height;
 const c=Math.floor((x-gut)/cw),l=Math.floor(y/ch);
 if(c<0||c>=cols||l<0||l>=L){hide();return;}
 const a=c*B,b=Math.min(Q,a+B),pos=B>1?'positions '+a+'-'+(b-1):'position '+a;
 show(e,'layer '+l+', '+pos+': '+(mean[l*cols+c]*H).toFixed(B>1?1:0)+' of '+H+' heads keep it\\n'+snippet(a,b));});
canvas.addEventListener('mouseleave',hide);
const prompt=document.getElementById('prompt');
tokens.forEach((t,i)=>{t.dataset.i=i;});
prompt.addEventListener('mouseover',e=>{const t=e.target.closest('.t');if(!t||!prompt.contains(t))return;
 const p=+t.dataset.i;let total=0,per=[];
 for(let l=0;l<L;l++){total+=C[l*Q+p];per.push('L'+l+' '+C[l*Q+p]+'/'+H);}
 const text=t.textContent?JSON.stringify(t.textContent):'(the first bytes of the next character)';
 show(e,'position '+p+' '+text+': kept by '+total+' of '+(L*H)+' (layer, head) pairs\\n'
  +per.join('  '));});
prompt.addEventListener('mouseout',hide);
document.body.dataset.ready='1';
})();
"""


def render_page(d: InspectData) -> str:
    """The page's HTML (UTF-8)."""
    counts = d.counts()
    share = counts.sum(0) / max(1, d.num_layers * d.num_heads)
    b = bin_size(d.prompt_len)
    binned = f" (binned: {b} positions per column)" if b > 1 else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pkv-export inspect: {_esc(d.policy)} on {_esc(d.model)}</title>
<style>{STYLE}</style></head>
<body>
{_header(d)}
{_budgets(d)}
<section><h2>Layers x prompt positions</h2>
<p class="hint">Each cell: how many of a layer's {d.num_heads} cache heads keep the token{binned}; hover for the text.
Strip below: <span style="color:#e08214">sinks</span>, <span style="color:#1a9850">window</span>,
<span style="color:#d7191c">marked span</span>.</p>
<div id="mapbox"><canvas id="map" width="1" height="1" data-columns="{math.ceil(d.prompt_len / b)}"
 data-bin="{b}"></canvas></div></section>
{_mark_report(d)}
{_prompt(d, share)}
<div id="tip"></div>
<script type="application/json" id="inspect-data">{_data(d, counts)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
