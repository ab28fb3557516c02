// Times one optimizer step of this crate and of TF.js's tf.train.rmsprop on the same
// WebGPU adapter (web/bench.html; `node web/run.mjs bench` reads `window.__bench`).
import init, { init_gpu, OptimizerBench, Trainer } from './pkg/fused_rmsprop_web.js';
import { describeAdapter } from './common.js';

const TOTAL = 1 << 20;
const LR = 1e-3, RHO = 0.9, EPS = 1e-7;
const WIDTHS = [32, 256, 256, 256, 8];
const BATCH = 32;
const log = document.getElementById('log');
const say = (s) => { log.textContent += `${s}\n`; };

// ms per step: `run(n)` runs n steps and resolves when the device has finished them;
// n doubles until one batch takes at least `seconds`
async function msPerStep(run, seconds = 1.0) {
  await run(1); // warm-up: pipelines, first allocations
  for (let n = 1; ; n *= 2) {
    const t0 = performance.now();
    await run(n);
    const ms = performance.now() - t0;
    if (ms >= seconds * 1000 || n >= 256) return ms / n;
  }
}

// the same tensors for both: values in [-1, 1), gradients in [-0.1, 0.1)
function sizes(tensors) {
  return Array.from({ length: tensors }, (_, t) => Math.floor(TOTAL / tensors) + (t < TOTAL % tensors ? 1 : 0));
}

async function tfjsOptimizerStep(tensors) {
  const vars = sizes(tensors).map((n, t) => tf.variable(tf.randomUniform([n], -1, 1), true, `bench_${tensors}_${t}`));
  const grads = {};
  vars.forEach((v) => { grads[v.name] = tf.randomUniform(v.shape, -0.1, 0.1); });
  const opt = tf.train.rmsprop(LR, RHO, 0, EPS, false);
  const ms = await msPerStep(async (n) => {
    for (let i = 0; i < n; i++) opt.applyGradients(grads);
    await tf.tidy(() => vars[0].slice(0, 1)).data();
  });
  opt.dispose();
  vars.forEach((v) => v.dispose());
  Object.values(grads).forEach((g) => g.dispose());
  return ms;
}

async function oursOptimizerStep(tensors) {
  const b = new OptimizerBench(tensors, TOTAL);
  const before = await b.first_value();
  const ms = await msPerStep((n) => b.run(n));
  if ((await b.first_value()) === before) throw new Error('fused-rmsprop: the parameters did not move');
  b.free();
  return ms;
}

// train_mlp's model in TF.js: Glorot-uniform kernels, zero biases, tanh, MSE
async function tfjsMlpStep() {
  const x = tf.randomUniform([8192, WIDTHS[0]], -1, 1);
  const p = tf.randomUniform([WIDTHS[0], WIDTHS[4]], -1, 1).div(Math.sqrt(WIDTHS[0]));
  const y = tf.sin(x.matMul(p).mul(2));
  const vars = [];
  for (let l = 0; l + 1 < WIDTHS.length; l++) {
    const limit = Math.sqrt(6 / (WIDTHS[l] + WIDTHS[l + 1]));
    vars.push(tf.variable(tf.randomUniform([WIDTHS[l], WIDTHS[l + 1]], -limit, limit)));
    vars.push(tf.variable(tf.zeros([WIDTHS[l + 1]])));
  }
  const opt = tf.train.rmsprop(LR, RHO, 0.5, EPS, false);
  let row = 0, loss = null;
  const step = () => opt.minimize(() => {
    const start = row; row = (row + BATCH) % (8192 - BATCH);
    let a = x.slice([start, 0], [BATCH, WIDTHS[0]]);
    for (let l = 0; l < 4; l++) {
      a = a.matMul(vars[2 * l]).add(vars[2 * l + 1]);
      if (l < 3) a = a.tanh();
    }
    return a.sub(y.slice([start, 0], [BATCH, WIDTHS[4]])).square().mean();
  }, true, vars);
  const ms = await msPerStep(async (n) => {
    for (let i = 0; i < n; i++) {
      if (loss) loss.dispose();
      loss = step();
    }
    await loss.data();
  });
  [x, p, y, loss, ...vars].forEach((t) => t.dispose());
  opt.dispose();
  return ms;
}

async function oursMlpStep() {
  const trainer = new Trainer(JSON.stringify({ backend: 'gpu', batch: BATCH, momentum: 0.5 }));
  const ms = await msPerStep((n) => trainer.run(n));
  trainer.free();
  return ms;
}

// `?only=ours` skips TF.js (a quick look at this crate alone)
const oursOnly = new URLSearchParams(location.search).get('only') === 'ours';

async function run() {
  await init();
  const adapter = await describeAdapter(await init_gpu());
  await tf.setBackend('webgpu');
  await tf.ready();
  say(`adapter: ${adapter}; TF.js ${tf.version.tfjs} on ${tf.getBackend()}`);
  const rows = [];
  for (const tensors of [1, 100, 1000]) {
    const name = `optimizer step, 1M parameters in ${tensors} tensor${tensors > 1 ? 's' : ''}`;
    const ours = await oursOptimizerStep(tensors);
    const tfjs = oursOnly ? NaN : await tfjsOptimizerStep(tensors);
    rows.push({ name, tensors, ours, tfjs });
    say(`${name}: ${ours.toFixed(2)} ms vs TF.js ${tfjs.toFixed(2)} ms (${(tfjs / ours).toFixed(1)}x)`);
  }
  const ours = await oursMlpStep();
  const tfjs = oursOnly ? NaN : await tfjsMlpStep();
  rows.push({ name: 'train_mlp training step (batch 32)', ours, tfjs });
  say(`MLP step: ${ours.toFixed(2)} ms vs TF.js ${tfjs.toFixed(2)} ms (${(tfjs / ours).toFixed(1)}x)`);
  const table = document.getElementById('table');
  table.innerHTML = '<tr><th>workload</th><th>fused-rmsprop ms/step</th><th>TF.js ms/step</th><th>speed-up</th></tr>' +
    rows.map((r) => `<tr><td>${r.name}</td><td>${r.ours.toFixed(2)}</td><td>${r.tfjs.toFixed(2)}</td><td>${(r.tfjs / r.ours).toFixed(1)}x</td></tr>`).join('');
  return { adapter, tfjs: tf.version.tfjs, userAgent: navigator.userAgent, rows };
}

const go = () => run().then((r) => { window.__bench = r; }, (e) => { say(`failed: ${e.message ?? e}`); window.__bench = { error: String(e.message ?? e) }; });
document.getElementById('go').addEventListener('click', go);
if (new URLSearchParams(location.search).has('auto')) go();
