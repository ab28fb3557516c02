// Compiles WGSL with Dawn's Tint (Chrome's WGSL compiler) through the `webgpu` npm
// package, on its `null` backend (no GPU needed), on a device with WebGPU's default
// limits: every shader module, and every compute pipeline of every specialization.
//
//   node tests/tint/check.mjs JOBS.json
//
// JOBS.json (written by the crate's `tint` unit test, src/gpu/tint.rs):
//   [{ "name", "code", "entryPoints": [...],
//      "bindings": [{ "binding", "kind": "uniform" | "read-only-storage" | "storage" }]
//                  (absent: layout 'auto'),
//      "specializations": [{ "OVERRIDE": value, ... }, ...],
//      "refused": [{ ... }, ...] (specializations pipeline creation must refuse) }]
// Prints one line per shader and a closing "N passed, M failed" line; exits non-zero
// on any error (shader creation, uniformity, override evaluation, limits).
import { readFileSync } from 'node:fs';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);

const jobs = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const gpu = create(['backend=null']);
const adapter = await gpu.requestAdapter();
if (!adapter) {
  console.error('tint: no adapter from Dawn\'s null backend');
  process.exit(1);
}
// no requiredLimits: WebGPU's defaults, what a browser gives
const device = await adapter.requestDevice();
let passed = 0;
let failed = 0;
for (const job of jobs) {
  const module = device.createShaderModule({ code: job.code });
  const info = await module.getCompilationInfo();
  const errors = info.messages.filter((m) => m.type === 'error');
  if (errors.length > 0) {
    for (const m of errors) {
      console.error(`${job.name}:${m.lineNum}:${m.linePos}: ${m.message}`);
    }
    failed += job.specializations.length * job.entryPoints.length;
    console.log(`${job.name}: shader module rejected`);
    continue;
  }
  let layout = 'auto';
  if (job.bindings) {
    const entries = job.bindings.map((b) => ({
      binding: b.binding,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: b.kind },
    }));
    const group = device.createBindGroupLayout({ entries });
    layout = device.createPipelineLayout({ bindGroupLayouts: [group] });
  }
  let jobFailed = 0;
  for (const constants of job.specializations) {
    for (const entryPoint of job.entryPoints) {
      device.pushErrorScope('validation');
      device.pushErrorScope('internal');
      await device.createComputePipelineAsync({
        layout,
        compute: { module, entryPoint, constants },
      }).catch((e) => {
        jobFailed += 1;
        if (jobFailed <= 5) {
          console.error(`${job.name} ${entryPoint} ${JSON.stringify(constants)}: ${e.message}`);
        }
      });
      const internal = await device.popErrorScope();
      const validation = await device.popErrorScope();
      for (const e of [internal, validation]) {
        if (e) {
          jobFailed += 1;
          if (jobFailed <= 5) {
            console.error(`${job.name} ${entryPoint} ${JSON.stringify(constants)}: ${e.message}`);
          }
        }
      }
    }
  }
  // specializations that must fail (codes the shader does not handle)
  for (const constants of job.refused ?? []) {
    let refused = false;
    device.pushErrorScope('validation');
    await device.createComputePipelineAsync({
      layout,
      compute: { module, entryPoint: job.entryPoints[0], constants },
    }).catch(() => { refused = true; });
    if (await device.popErrorScope()) {
      refused = true;
    }
    if (!refused) {
      jobFailed += 1;
      console.error(`${job.name}: ${JSON.stringify(constants)} was accepted; the shader must refuse it`);
    }
  }
  const total = job.specializations.length * job.entryPoints.length;
  failed += jobFailed;
  passed += total - Math.min(jobFailed, total);
  console.log(`${job.name}: ${total} pipelines (${job.specializations.length} specializations x ${job.entryPoints.length} entry points), ${jobFailed} failed`);
}
console.log(`tint: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
