// What the pages share: the loss plot, the adapter's description.

// The loss curve, drawn on a canvas with a log-scale y axis.
export function drawLoss(canvas, points) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  const pad = { left: 56, right: 12, top: 12, bottom: 30 };
  ctx.clearRect(0, 0, w, h);
  ctx.font = '12px system-ui, sans-serif';
  ctx.fillStyle = '#555';
  ctx.strokeStyle = '#ddd';
  const finite = points.filter(([, l]) => Number.isFinite(l) && l > 0);
  if (finite.length === 0) {
    ctx.fillText('the loss appears here while training runs', pad.left, h / 2);
    return;
  }
  const lastStep = Math.max(1, finite[finite.length - 1][0]);
  const logs = finite.map(([, l]) => Math.log10(l));
  let lo = Math.floor(Math.min(...logs));
  let hi = Math.ceil(Math.max(...logs));
  if (hi === lo) hi = lo + 1;
  const x = (s) => pad.left + (s / lastStep) * (w - pad.left - pad.right);
  const y = (l) => pad.top + ((hi - Math.log10(l)) / (hi - lo)) * (h - pad.top - pad.bottom);
  for (let e = lo; e <= hi; e++) {
    const yy = y(10 ** e);
    ctx.beginPath(); ctx.moveTo(pad.left, yy); ctx.lineTo(w - pad.right, yy); ctx.stroke();
    ctx.fillText(`1e${e}`, 8, yy + 4);
  }
  ctx.fillText('step', (pad.left + w - pad.right) / 2 - 12, h - 8);
  ctx.fillText('0', pad.left, h - 8);
  ctx.fillText(String(lastStep), x(lastStep) - 24, h - 8);
  ctx.fillText('batch loss (log scale)', pad.left + 8, pad.top + 12);
  ctx.strokeStyle = '#1f6fd1';
  ctx.lineWidth = 2;
  ctx.beginPath();
  finite.forEach(([s, l], i) => (i ? ctx.lineTo(x(s), y(l)) : ctx.moveTo(x(s), y(l))));
  ctx.stroke();
  ctx.lineWidth = 1;
}

// The adapter as the browser describes it (wgpu's name for a browser adapter is the
// often empty `info.description`): vendor, architecture and description.
export async function describeAdapter(fallback) {
  const info = (await navigator.gpu?.requestAdapter())?.info;
  const parts = info ? [info.vendor, info.architecture, info.description].filter(Boolean) : [];
  return parts.length ? `${parts.join(' ')} (WebGPU)` : fallback;
}
