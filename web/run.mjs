#!/usr/bin/env node
// Serves the repository and drives headless Chromium (through chromedriver) on WebGPU
// (SwiftShader) over the pages in web/.
//
//   node web/run.mjs           # web/test.html: traces, bad input, the MLP; exit 1 on failure
//   node web/run.mjs bench     # web/bench.html: this crate vs TensorFlow.js (needs `npm ci --prefix web`)
//   node web/run.mjs screenshot  # web/index.html training, saved as web/screenshot.png
//   node web/run.mjs serve [PORT]  # just serve: open http://localhost:PORT/web/ in a browser
//
// Build the wasm module first: bash web/build.sh (it installs what it needs).
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const [mode = 'test', portArg] = process.argv.slice(2);
const TYPES = {
  '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.wasm': 'application/wasm', '.json': 'application/json', '.css': 'text/css',
  '.png': 'image/png', '.map': 'application/json',
};
// Chromium with WebGPU on SwiftShader, headless (../shared notes: checked on Chromium 156)
const CHROME_ARGS = [
  '--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--enable-unsafe-webgpu',
  '--enable-features=Vulkan', '--use-vulkan=swiftshader', '--use-webgpu-adapter=swiftshader',
  '--window-size=900,1250',
];

function traces() {
  return ['tests/keras/traces', 'tests/keras/loss_scale'].flatMap((dir) =>
    fs.readdirSync(path.join(root, dir)).filter((f) => f.endsWith('.json')).sort().map((f) => `${dir}/${f}`));
}

function serve(port) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    if (url.pathname === '/') { res.writeHead(302, { Location: '/web/' }); res.end(); return; }
    if (url.pathname === '/traces') {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify(traces()));
      return;
    }
    let file = path.join(root, decodeURIComponent(url.pathname));
    if (file.endsWith(path.sep)) file = path.join(file, 'index.html');
    if (!file.startsWith(root + path.sep) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404); res.end('not found'); return;
    }
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'Cache-Control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A minimal WebDriver client: the few commands this script needs.
class Browser {
  static async start() {
    const port = 9515 + Math.floor(Math.random() * 400);
    const driver = spawn(process.env.CHROMEDRIVER ?? 'chromedriver', [`--port=${port}`], { stdio: 'ignore' });
    const driverFailed = new Promise((_, reject) => driver.on('error', (e) => reject(new Error(`chromedriver: ${e.message} (bash web/build.sh installs it)`))));
    const b = new Browser(`http://127.0.0.1:${port}`, driver);
    for (let i = 0; ; i++) {
      try {
        if ((await Promise.race([fetch(`${b.base}/status`), driverFailed])).ok) break;
      } catch (e) {
        if (i > 100 || e.message.startsWith('chromedriver')) throw e;
        await sleep(100);
      }
    }
    const binary = process.env.CHROMIUM ?? (fs.existsSync('/usr/lib/chromium/chromium') ? '/usr/lib/chromium/chromium' : undefined);
    const session = await b.call('POST', '/session', {
      capabilities: { alwaysMatch: { browserName: 'chrome', 'goog:chromeOptions': { args: CHROME_ARGS, ...(binary ? { binary } : {}) } } },
    });
    b.session = `/session/${session.sessionId}`;
    return b;
  }

  constructor(base, driver) { this.base = base; this.driver = driver; }

  async call(method, route, body) {
    const res = await fetch(this.base + route, { method, headers: { 'Content-Type': 'application/json' }, body: body && JSON.stringify(body) });
    const json = await res.json();
    if (!res.ok) throw new Error(`webdriver ${route}: ${json.value?.message ?? res.status}`);
    return json.value;
  }

  open(url) { return this.call('POST', `${this.session}/url`, { url }); }

  run(script) { return this.call('POST', `${this.session}/execute/sync`, { script, args: [] }); }

  // polls `expression` until it is not null, for at most `seconds`
  async until(expression, seconds) {
    const end = Date.now() + seconds * 1000;
    while (Date.now() < end) {
      const v = await this.run(`return (${expression}) ?? null;`);
      if (v !== null) return v;
      await sleep(500);
    }
    throw new Error(`timed out after ${seconds} s waiting for ${expression}`);
  }

  async screenshot(file) {
    fs.writeFileSync(file, Buffer.from(await this.call('GET', `${this.session}/screenshot`), 'base64'));
  }

  async stop() {
    try { if (this.session) await this.call('DELETE', this.session); } catch { /* already gone */ }
    this.driver.kill();
  }
}

async function main() {
  if (!fs.existsSync(path.join(root, 'web/pkg/fused_rmsprop_web.js'))) {
    throw new Error('web/pkg is missing: build the wasm module first with `bash web/build.sh`');
  }
  const port = Number(portArg ?? (mode === 'serve' ? 8080 : 0));
  const server = await serve(port);
  const url = `http://127.0.0.1:${server.address().port}`;
  if (mode === 'serve') {
    console.log(`serving ${root} at ${url}/web/ (the training page), ${url}/web/bench.html, ${url}/web/test.html`);
    return;
  }
  const browser = await Browser.start();
  try {
    if (mode === 'test') process.exitCode = await test(browser, url);
    else if (mode === 'bench') await bench(browser, url);
    else if (mode === 'screenshot') await screenshot(browser, url);
    else throw new Error(`unknown mode ${mode} (test, bench, screenshot, serve)`);
  } finally {
    await browser.stop();
    server.close();
  }
}

async function test(browser, url) {
  await browser.open(`${url}/web/test.html`);
  const r = await browser.until('window.__result', 900);
  for (const f of r.failures) console.log(`FAIL ${f}`);
  for (const [what, text] of Object.entries(r.errors)) console.log(`error shown (${what}): ${text}`);
  for (const [backend, m] of Object.entries(r.mlp)) {
    console.log(`MLP on ${backend} (${m.adapter}): ${m.first.toExponential(3)} -> ${m.last.toExponential(3)} in ${m.steps} steps, ${m.steps_per_second.toFixed(1)} steps/s`);
  }
  for (const o of r.options ?? []) {
    const { gpu, cpu, ...combo } = o;
    console.log(`options ${JSON.stringify(combo)}: gpu ${gpu[0].toExponential(3)} -> ${gpu[1].toExponential(3)}, cpu ${cpu[0].toExponential(3)} -> ${cpu[1].toExponential(3)}`);
  }
  const matched = r.traces.filter((t) => t.matches).length;
  const fell = r.mlp.gpu ? `${r.mlp.gpu.fell.toFixed(1)}x` : 'not at all (no WebGPU)';
  console.log(`browser: ${matched}/${r.traces.length} traces match, MLP loss fell ${fell} on ${r.adapter ?? 'no adapter'}`);
  return r.failures.length === 0 && r.traces.length > 0 && r.mlp.gpu ? 0 : 1;
}

async function bench(browser, url) {
  if (!fs.existsSync(path.join(root, 'web/node_modules/@tensorflow/tfjs-backend-webgpu'))) {
    throw new Error('TensorFlow.js is missing: npm ci --prefix web');
  }
  await browser.open(`${url}/web/bench.html?auto${process.env.BENCH_ONLY ? `&only=${process.env.BENCH_ONLY}` : ''}`);
  const r = await browser.until('window.__bench', 3600);
  if (r.error) throw new Error(r.error);
  console.log(`adapter: ${r.adapter}; ${r.userAgent}`);
  console.log('| workload | fused-rmsprop ms/step | TF.js ms/step | speed-up |');
  console.log('| --- | ---: | ---: | ---: |');
  for (const row of r.rows) {
    const tfjs = row.tfjs ?? NaN; // skipped: null in JSON
    console.log(`| ${row.name} | ${row.ours.toFixed(2)} | ${tfjs.toFixed(2)} | ${(tfjs / row.ours).toFixed(1)}x |`);
  }
  fs.mkdirSync(path.join(root, 'web/results'), { recursive: true });
  const out = path.join(root, 'web/results', `bench-${new Date().toISOString().slice(0, 10)}.json`);
  fs.writeFileSync(out, JSON.stringify(r, null, 1));
  console.log(`raw results: ${path.relative(root, out)}`);
}

async function screenshot(browser, url) {
  await browser.open(`${url}/web/index.html?autostart`);
  const done = await browser.until('window.__done', 900);
  const file = path.join(root, 'web/screenshot.png');
  await browser.screenshot(file);
  console.log(`trained ${done.steps} steps (loss ${done.first} -> ${done.last}); saved ${path.relative(root, file)}`);
}

main().catch((e) => { console.error(`browser run failed: ${e.message}`); process.exit(1); });
