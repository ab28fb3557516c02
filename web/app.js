// The training page: the train_mlp model on this page's WebGPU (or the CPU path when
// the browser has none), with the optimizer's options selectable and the loss plotted.
// `?autostart` starts training at once and sets `window.__done` when it ends (the
// README's screenshot is taken so, by `node web/run.mjs screenshot`).
import init, { init_gpu, gpu_limits, Trainer, replay_trace } from './pkg/fused_rmsprop_web.js';
import { drawLoss, describeAdapter } from './common.js';

const $ = (id) => document.getElementById(id);
const form = $('options');
let gpuName = null;
let running = false;

function showError(e) {
  $('error').hidden = false;
  $('error').textContent = String(e && e.message ? e.message : e);
}

function options() {
  const f = new FormData(form);
  let backend = f.get('backend');
  if (backend === 'auto') backend = gpuName ? 'gpu' : 'cpu';
  return {
    backend,
    momentum: Number(f.get('momentum')),
    centered: f.get('centered') === 'on',
    clipping: f.get('clipping'),
    state: f.get('state'),
    batch: Number(f.get('batch')),
    seed: 7,
    steps: Number(f.get('steps')),
  };
}

async function train() {
  $('error').hidden = true;
  const o = options();
  let trainer;
  try {
    trainer = new Trainer(JSON.stringify(o));
  } catch (e) {
    showError(e);
    return;
  }
  $('adapter').textContent = trainer.backend() === 'gpu' ? gpuName : trainer.adapter();
  $('backend').textContent = trainer.backend();
  $('state').textContent = `${o.state}, ${(trainer.state_bytes() / 1024).toFixed(0)} KiB of slots`;
  running = true;
  $('start').disabled = true;
  $('stop').disabled = false;
  const points = [];
  const started = performance.now();
  let step = 0;
  // a few steps per animation frame, one loss readback each time
  const chunk = trainer.backend() === 'gpu' ? 5 : 1;
  try {
    while (running && step < o.steps) {
      const n = Math.min(chunk, o.steps - step);
      const loss = await trainer.run(n);
      step += n;
      points.push([step - 1, loss]);
      const seconds = (performance.now() - started) / 1000;
      $('step').textContent = `${step} / ${o.steps}`;
      $('loss').textContent = loss.toExponential(3);
      $('rate').textContent = (step / seconds).toFixed(1);
      drawLoss($('plot'), points);
      await new Promise((r) => requestAnimationFrame(r));
    }
  } catch (e) {
    showError(e);
  } finally {
    trainer.free();
    running = false;
    $('start').disabled = false;
    $('stop').disabled = true;
    window.__done = { steps: step, first: points[0]?.[1], last: points[points.length - 1]?.[1] };
  }
}

async function replayFile(file) {
  const text = await file.text();
  const lines = [];
  for (const backend of gpuName ? ['gpu', 'cpu'] : ['cpu']) {
    try {
      const r = JSON.parse(await replay_trace(text, backend));
      lines.push(`${r.name} on ${r.backend}: ${r.matches ? 'matches Keras' : `differs: ${r.mismatch}`}`);
    } catch (e) {
      lines.push(`${backend}: ${e.message ?? e}`);
    }
  }
  $('trace-result').textContent = lines.join('\n');
}

async function main() {
  await init();
  drawLoss($('plot'), []);
  try {
    gpuName = await describeAdapter(await init_gpu());
    $('adapter').textContent = `${gpuName} (${gpu_limits()})`;
  } catch (e) {
    $('note').hidden = false;
    $('note').textContent = `WebGPU is not usable here, so the optimizer runs on its CPU path (wasm, one thread). Why: ${e.message ?? e}`;
    $('adapter').textContent = 'none (CPU path)';
  }
  form.addEventListener('submit', (ev) => { ev.preventDefault(); if (!running) train(); });
  $('stop').addEventListener('click', () => { running = false; });
  $('trace').addEventListener('change', (ev) => { if (ev.target.files[0]) replayFile(ev.target.files[0]); });
  if (new URLSearchParams(location.search).has('autostart')) train();
}

main().catch(showError);
