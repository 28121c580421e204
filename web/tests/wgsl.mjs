// Every WGSL kernel ov3 compiles, through Chromium's WGSL compiler (Tint, on SwiftShader's WebGPU): Tint is
// stricter than the naga of native wgpu (a literal out of f32's range, uniformity), and the page runs only the
// inference kernels, so the training kernels are compiled here too.
//
//   node wgsl.mjs URL KERNELS.json
//
// KERNELS.json is `ov3 info --wgsl FILE`'s (name -> source). URL: any page on the local server (a secure
// context, for navigator.gpu). f16 variants are skipped, and said so, when the adapter has no shader-f16, and
// the flash kernels' split variants when it has no subgroups.
// Exits 1 on any compilation error.

import { chromium } from 'playwright-core';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, kernelsPath] = process.argv.slice(2);
const kernels = JSON.parse(readFileSync(kernelsPath, 'utf8'));
const args = [
  '--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--enable-unsafe-webgpu', '--enable-unsafe-swiftshader', '--use-webgpu-adapter=swiftshader',
];
const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'ov3-wgsl-')), {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args,
});
let failed = 0;
try {
  const page = await context.newPage();
  await page.goto(pageUrl);
  const results = await page.evaluate(async (kernels) => {
    if (!navigator.gpu) return { error: 'no navigator.gpu' };
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return { error: 'no WebGPU adapter' };
    const f16 = adapter.features.has('shader-f16');
    const subgroups = adapter.features.has('subgroups');
    const requiredFeatures = [...(f16 ? ['shader-f16'] : []), ...(subgroups ? ['subgroups'] : [])];
    const device = await adapter.requestDevice({ requiredFeatures });
    const out = {};
    for (const [name, code] of Object.entries(kernels)) {
      if (!f16 && /^\s*enable f16;/m.test(code)) {
        out[name] = 'skipped (no shader-f16)';
        continue;
      }
      if (!subgroups && /^\s*enable subgroups;/m.test(code)) {
        out[name] = 'skipped (no subgroups)';
        continue;
      }
      const info = await device.createShaderModule({ code }).getCompilationInfo();
      const errors = info.messages.filter((m) => m.type === 'error');
      out[name] = errors.length ? errors.map((m) => `${m.lineNum}:${m.linePos} ${m.message}`).join('; ') : 'ok';
    }
    return out;
  }, kernels);
  if (results.error) {
    console.log(`FAIL ${results.error}`);
    failed += 1;
  } else {
    for (const [name, result] of Object.entries(results)) {
      const ok = result === 'ok' || result.startsWith('skipped');
      console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}: ${result}`);
      if (!ok) failed += 1;
    }
  }
} finally {
  await context.close();
}
if (failed) {
  console.log(`${failed} kernel(s) failed to compile`);
  process.exit(1);
}
console.log('every WGSL kernel compiles in Chromium');
