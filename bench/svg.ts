/**
 * The chart: one bar group per scenario, one bar per tool, height = median
 * wall time over cat's in the same scenario (log scale, so 1.3× and 30× are
 * both readable), a whisker for min–max, the ratio written on each bar.
 */
import type { BenchResult, ScenarioResult } from './report.js';

const W = 980;
const H = 460;
const M = { top: 56, right: 16, bottom: 110, left: 64 };
const COLORS = ['#1f77b4', '#6baed6', '#d62728', '#ff9896', '#7f7f7f', '#2ca02c', '#9467bd', '#c5b0d5'];
const TICKS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const size = (b: number): string => (b >= 1024 ** 3 ? `${+(b / 1024 ** 3).toFixed(2)} GiB` : `${+(b / 1024 ** 2).toFixed(1)} MiB`);
const num = (x: number): string => (x >= 10 ? x.toFixed(0) : x >= 1 ? x.toFixed(1) : x.toFixed(2));

interface Bar {
  tool: string;
  ratio: number;
  lo: number;
  hi: number;
}

function bars(s: ScenarioResult, ref: number): Bar[] {
  return s.tools.flatMap((t) =>
    t.status !== 'ok' || t.summary?.ratioToRef === undefined
      ? []
      : [{ tool: t.label, ratio: t.summary.ratioToRef, lo: t.summary.wallMinS / ref, hi: t.summary.wallMaxS / ref }],
  );
}

export function chart(r: BenchResult, refLabel: string): string {
  const groups = r.scenarios.flatMap((s) => {
    const ref = s.tools.find((t) => t.label === refLabel)?.summary?.wallMedianS;
    return ref ? [{ s, ref, bars: bars(s, ref) }] : [];
  });
  const all = groups.flatMap((g) => g.bars);
  const tools = [...new Set(all.map((b) => b.tool))];
  const lo = Math.min(0.5, ...all.map((b) => b.lo)) / 1.2;
  const hi = Math.max(2, ...all.map((b) => b.hi)) * 1.3;
  const plotH = H - M.top - M.bottom;
  const y = (v: number): number => M.top + plotH * (1 - Math.log(v / lo) / Math.log(hi / lo));
  const groupW = (W - M.left - M.right) / Math.max(1, groups.length);
  const barW = Math.min(28, (groupW - 16) / Math.max(1, tools.length));
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="#fff"/>`,
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">qsync benchmark: wall time ÷ ${esc(refLabel)} (median of ${r.options.runs}, ${r.options.cache} cache, log scale; lower is better)</text>`,
    `<text x="${W / 2}" y="38" text-anchor="middle" fill="#555">${esc(`${size(r.options.size)} images · ${r.machine.nproc} × ${r.machine.cpu} · ${r.machine.memGiB} GiB RAM · Linux ${r.machine.kernel} · ${r.date.slice(0, 10)}`)}</text>`,
  ];
  for (const t of TICKS.filter((t) => t >= lo && t <= hi)) {
    const ty = y(t).toFixed(1);
    const stroke = t === 1 ? '#333' : '#ddd';
    out.push(
      `<line x1="${M.left}" x2="${W - M.right}" y1="${ty}" y2="${ty}" stroke="${stroke}"/>`,
      `<text x="${M.left - 6}" y="${ty}" text-anchor="end" dominant-baseline="middle">${t}×</text>`,
    );
  }
  groups.forEach((g, gi) => {
    const x0 = M.left + gi * groupW + (groupW - barW * g.bars.length) / 2;
    for (const [i, b] of g.bars.entries()) {
      const x = x0 + i * barW;
      const top = y(b.ratio);
      const cx = (x + barW / 2).toFixed(1);
      const color = COLORS[tools.indexOf(b.tool) % COLORS.length]!;
      out.push(
        `<rect x="${x.toFixed(1)}" y="${top.toFixed(1)}" width="${(barW - 2).toFixed(1)}" height="${(y(lo) - top).toFixed(1)}" fill="${color}"><title>${esc(`${g.s.name} · ${b.tool}: ${num(b.ratio)}× (${num(b.lo)}–${num(b.hi)})`)}</title></rect>`,
        `<line x1="${cx}" x2="${cx}" y1="${y(b.lo).toFixed(1)}" y2="${y(b.hi).toFixed(1)}" stroke="#000" stroke-width="1"/>`,
        `<text x="${cx}" y="${(Math.min(top, y(b.hi)) - 3).toFixed(1)}" text-anchor="middle" font-size="9">${num(b.ratio)}</text>`,
      );
    }
    const gx = (M.left + (gi + 0.5) * groupW).toFixed(1);
    out.push(
      `<text x="${gx}" y="${H - M.bottom + 16}" text-anchor="middle" font-weight="bold">${esc(g.s.name)}</text>`,
      `<text x="${gx}" y="${H - M.bottom + 30}" text-anchor="middle" fill="#555">${esc(refLabel)} ${g.ref.toFixed(2)} s</text>`,
    );
  });
  const legendW = (W - M.left - M.right) / Math.max(1, Math.min(tools.length, 4));
  tools.forEach((t, i) => {
    const lx = M.left + (i % 4) * legendW;
    const ly = H - M.bottom + 52 + Math.floor(i / 4) * 18;
    out.push(
      `<rect x="${lx}" y="${ly - 9}" width="12" height="12" fill="${COLORS[i % COLORS.length]}"/>`,
      `<text x="${lx + 18}" y="${ly + 1}">${esc(t)}</text>`,
    );
  });
  const absent = [...new Set(r.scenarios.flatMap((s) => s.tools.filter((t) => t.status !== 'ok').map((t) => `${t.label} (${t.status})`)))];
  if (absent.length) out.push(`<text x="${M.left}" y="${H - 8}" fill="#a00">${esc(`not shown: ${absent.join(', ')}`)}</text>`);
  out.push('</svg>', '');
  return out.join('\n');
}
