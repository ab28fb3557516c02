// The browser test run (web/run.mjs loads this page in headless Chromium and reads
// `window.__result`): traces, bad input, the MLP. Every check records a failure
// instead of stopping, so one run reports everything.
import init, { init_gpu, replay_trace, wrap_new_device, Trainer } from './pkg/fused_rmsprop_web.js';
import { drawLoss, describeAdapter } from './common.js';

const MLP_STEPS = 150;
const OPTION_STEPS = 40;
const log = document.getElementById('log');
const lines = [];
const say = (s) => { lines.push(s); log.textContent = lines.join('\n'); };
const message = (e) => String(e && e.message ? e.message : e);
const trapped = (e) => e instanceof WebAssembly.RuntimeError;

async function run() {
  const result = { adapter: null, traces: [], mlp: {}, errors: {}, failures: [] };
  const fail = (what) => { result.failures.push(what); say(`FAIL ${what}`); };
  await init();

  // WebGPU missing: the crate's NoAdapter error, then the CPU path trains
  const gpu = Object.getOwnPropertyDescriptor(Navigator.prototype, 'gpu');
  Object.defineProperty(navigator, 'gpu', { value: undefined, configurable: true });
  try {
    await init_gpu();
    fail('without navigator.gpu, init_gpu succeeded');
  } catch (e) {
    result.errors.no_webgpu = message(e);
    if (trapped(e) || !/no GPU adapter/.test(message(e))) fail(`without WebGPU: ${message(e)}`);
    else say(`without WebGPU: ${message(e)}`);
  }
  delete navigator.gpu;
  if (!gpu || !navigator.gpu) fail('this browser has no navigator.gpu');

  try {
    result.adapter = await describeAdapter(await init_gpu());
    say(`adapter: ${result.adapter}`);
  } catch (e) {
    fail(`init_gpu: ${message(e)}`);
  }

  // a device below the kernels' limits: WebGPU raises any limit a page asks for to its
  // default (8 storage buffers per stage, above the 4 the kernels need), so the device
  // is made to report 3, as a lesser implementation would
  if (result.adapter) {
    const real = Object.getOwnPropertyDescriptor(GPUDevice.prototype, 'limits');
    Object.defineProperty(GPUDevice.prototype, 'limits', {
      configurable: true,
      get() {
        const limits = real.get.call(this);
        return new Proxy(limits, { get: (t, k) => (k === 'maxStorageBuffersPerShaderStage' ? 3 : t[k]) });
      },
    });
    try {
      const accepted = await wrap_new_device();
      fail(`a device reporting 3 storage buffers per stage was accepted (${accepted})`);
    } catch (e) {
      result.errors.device_limit = message(e);
      if (trapped(e) || !/max_storage_buffers_per_shader_stage/.test(message(e))) {
        fail(`a device reporting 3 storage buffers: ${message(e)}`);
      } else {
        say(`a device reporting 3 storage buffers: ${message(e)}`);
      }
    } finally {
      Object.defineProperty(GPUDevice.prototype, 'limits', real);
    }
  }

  // a trace that does not parse
  try {
    await replay_trace('{"format": "rmsprop-trace/1", "config": ', 'cpu');
    fail('a truncated trace was accepted');
  } catch (e) {
    result.errors.bad_trace = message(e);
    if (trapped(e)) fail(`a truncated trace trapped: ${message(e)}`);
    else say(`truncated trace: ${message(e)}`);
  }

  // every Keras trace, on WebGPU and on the CPU path
  const files = await (await fetch('/traces')).json();
  for (const file of files) {
    const text = await (await fetch(`/${file}`)).text();
    for (const backend of result.adapter ? ['gpu', 'cpu'] : ['cpu']) {
      try {
        const r = JSON.parse(await replay_trace(text, backend));
        result.traces.push({ file, backend: r.backend, matches: r.matches, mismatch: r.mismatch });
        if (!r.matches || r.backend !== backend) fail(`${file} on ${backend}: ${r.mismatch ?? `ran on ${r.backend}`}`);
      } catch (e) {
        result.traces.push({ file, backend, matches: false, mismatch: message(e) });
        fail(`${file} on ${backend}: ${message(e)}`);
      }
    }
  }
  const matched = result.traces.filter((t) => t.matches).length;
  say(`traces: ${matched}/${result.traces.length} match Keras (${files.length} files)`);

  // the MLP: on WebGPU (the page's path), and a short run on the CPU path
  for (const backend of result.adapter ? ['gpu', 'cpu'] : ['cpu']) {
    const steps = backend === 'gpu' ? MLP_STEPS : 100;
    try {
      const trainer = new Trainer(JSON.stringify({ backend, batch: 32, momentum: 0.5 }));
      const points = [[0, await trainer.run(1)]];
      const started = performance.now();
      for (let s = 1; s < steps; s += 10) {
        points.push([Math.min(s + 9, steps - 1), await trainer.run(Math.min(10, steps - s))]);
      }
      const seconds = (performance.now() - started) / 1000;
      const [first, last] = [points[0][1], points[points.length - 1][1]];
      result.mlp[backend] = { steps, first, last, fell: first / last, steps_per_second: (steps - 1) / seconds, adapter: backend === 'gpu' ? result.adapter : trainer.adapter() };
      trainer.free();
      if (backend === 'gpu') drawLoss(document.getElementById('plot'), points);
      say(`MLP on ${backend}: loss ${first.toExponential(3)} -> ${last.toExponential(3)} (${(first / last).toFixed(1)}x) in ${steps} steps, ${((steps - 1) / seconds).toFixed(1)} steps/s`);
      if (!(first / last >= 10)) fail(`MLP on ${backend}: the loss fell only ${(first / last).toFixed(2)}x`);
    } catch (e) {
      fail(`MLP on ${backend}: ${message(e)}`);
    }
  }
  // the page's option controls: each combination trains on WebGPU and on the CPU path
  // from the same start, and both must make the loss fall alike
  result.options = [];
  const combos = [
    { momentum: 0.9, centered: true, clipping: 'global_clipnorm', state: 'int8' },
    { momentum: 0.0, centered: false, clipping: 'clipnorm', state: 'bf16' },
    { momentum: 0.5, centered: true, clipping: 'clipvalue', state: 'f32' },
  ];
  for (const combo of result.adapter ? combos : []) {
    const losses = {};
    for (const backend of ['gpu', 'cpu']) {
      try {
        const trainer = new Trainer(JSON.stringify({ backend, batch: 32, ...combo }));
        losses[backend] = [await trainer.run(1), await trainer.run(OPTION_STEPS - 1)];
        trainer.free();
      } catch (e) {
        fail(`options ${JSON.stringify(combo)} on ${backend}: ${message(e)}`);
      }
    }
    if (!losses.gpu || !losses.cpu) continue;
    const [g0, g1] = losses.gpu;
    const [c0, c1] = losses.cpu;
    result.options.push({ ...combo, gpu: losses.gpu, cpu: losses.cpu });
    const line = `options ${JSON.stringify(combo)}: gpu ${g0.toExponential(3)} -> ${g1.toExponential(3)}, cpu ${c0.toExponential(3)} -> ${c1.toExponential(3)}`;
    // the same data and start: the first losses agree to float rounding, and after
    // OPTION_STEPS steps both fell at least 3x and lie within 5% of each other
    if (Math.abs(g0 - c0) > 1e-4 * c0 || !(g0 / g1 >= 3 && c0 / c1 >= 3) || Math.abs(g1 - c1) > 0.05 * c1) fail(line);
    else say(line);
  }
  return result;
}

run()
  .then((r) => { window.__result = r; })
  .catch((e) => { window.__result = { failures: [`the test page failed: ${message(e)}`], traces: [], mlp: {}, errors: {} }; say(message(e)); });
