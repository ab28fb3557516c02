// The browser test run (web/run.mjs loads this page in headless Chromium and reads
// `window.__result`): traces, bad input, the MLP. Every check records a failure
// instead of stopping, so one run reports everything.
import init, { init_gpu, replay_trace, wrap_new_device, Trainer } from './pkg/fused_rmsprop_web.js';
import { drawLoss, describeAdapter } from './common.js';

const MLP_STEPS = 150;
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
  return result;
}

run()
  .then((r) => { window.__result = r; })
  .catch((e) => { window.__result = { failures: [`the test page failed: ${message(e)}`], traces: [], mlp: {}, errors: {} }; say(message(e)); });
