// End-to-end test of the demo page in Debian's headless Chromium, driven by playwright-core.
//
//   node browser.mjs URL EXPECTED.json OUT_DIR [--no-webgpu | --fused]
//
// EXPECTED.json (written by run.sh from the native `ov3` CLI on the same files):
//   { "upload": PATH, "psnr": dB of `ov3 reconstruct` for PATH, "sample": index, "top": first line of `ov3 rank`,
//     "caption": the sample's true caption, "not_an_image": PATH }
// Checks: the page starts on the expected backend; an uploaded photo is reconstructed with the PSNR the
// native CLI computes (within 0.5 dB); a 4000x3000 JPEG is decoded and shrunk by the browser and keeps the
// native PSNR within 1 dB (its page stall is logged); a shipped sample ranks its true caption first, as natively; a file
// that is not an image gives a message and the page keeps working; an upload overtaken by a newer request is
// never drawn over it. Writes a screenshot and timings.json.
// --fused opens the page with ?attention=fused: every transformer runs our WGSL flash-attention kernels
// (shaders/), compiled by Chromium's Tint, and the same checks hold.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, expectedPath, outDir, flag] = process.argv.slice(2);
const webgpu = flag !== '--no-webgpu';
const fused = flag === '--fused';
const url = fused ? `${pageUrl}?attention=fused` : pageUrl;
const variant = fused ? '-fused' : webgpu ? '' : '-cpu';
const expected = JSON.parse(readFileSync(expectedPath, 'utf8'));
const failures = [];
const check = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
};

// A closed network: no component updates, no sync, nothing fetched but the page.
const args = [
  '--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic', '--disable-default-apps', '--disable-extensions',
];
if (webgpu) args.push('--enable-unsafe-webgpu', '--enable-unsafe-swiftshader', '--use-webgpu-adapter=swiftshader');

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'ov3-chromium-')), {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args,
  viewport: { width: 1200, height: 1400 },
});
const page = await context.newPage();
page.on('console', (m) => console.log(`[page ${m.type()}] ${m.text()}`));
page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));

// Every finished image bumps data-runs; waiting for the next value avoids racing a fast run.
const runs = async () => Number(await page.getAttribute('#app', 'data-runs')) || 0;
const waitRun = async (before) =>
  page.waitForFunction((n) => Number(document.getElementById('app').dataset.runs || 0) > n, before, {
    timeout: 600_000,
  });
const text = async (sel) => ((await page.textContent(sel)) || '').trim();

try {
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => ['ready', 'failed'].includes(document.getElementById('app').dataset.state), null, {
    timeout: 600_000,
  });
  const loadMs = Date.now() - t0;
  const backend = await text('#backend');
  console.log(`backend: ${backend}; model: ${await text('#model')}; ready after ${loadMs} ms`);
  check((await page.getAttribute('#app', 'data-state')) === 'ready', `page ready (message: "${await text('#message')}")`);
  check(webgpu ? backend.startsWith('WebGPU') : backend.startsWith('CPU'), `backend is ${webgpu ? 'WebGPU' : 'the CPU fallback'}`);
  if (fused) check(backend.includes('fused WGSL attention'), 'the fused attention kernels are in use');

  // 1. Upload a real photo: the PSNR shown must match the native CLI.
  let before = await runs();
  await page.setInputFiles('#file', expected.upload);
  await waitRun(before);
  const psnr = Number(await page.getAttribute('#psnr-ov3', 'data-value'));
  const psnrVae = Number(await page.getAttribute('#psnr-vae-only', 'data-value'));
  check(Math.abs(psnr - expected.psnr) < 0.5, `upload: PSNR ${psnr.toFixed(3)} dB vs native ${expected.psnr} dB (within 0.5)`);
  check(Math.abs(psnrVae - expected.psnr_vae) < 0.5, `upload: VAE-only PSNR ${psnrVae.toFixed(3)} vs native ${expected.psnr_vae}`);
  const timings = await text('#timings');
  console.log(`timings (first image, includes shader compilation): ${timings}`);
  check((await text('#caption')).length > 0, `a caption was generated: "${await text('#caption')}"`);

  // 1b. A phone-sized photo (4000x3000 JPEG, made here from a shipped photo upscaled with seeded noise, once
  // per test run): the browser decodes and shrinks it off the page's thread, then ov3 crops and resizes it.
  // Its PSNR must stay near the native CLI's, which decodes all 12 Mpx itself; the longest gap between
  // 20 ms timer ticks while it is processed says how long the page stood still (logged, not asserted: it
  // depends on the machine's load).
  const large = join(outDir, 'large-4000x3000.jpg');
  if (!existsSync(large)) {
    const b64 = await page.evaluate(async () => {
      const photo = await createImageBitmap(await (await fetch('photos/astronaut.jpg')).blob());
      const canvas = new OffscreenCanvas(4000, 3000);
      const ctx = canvas.getContext('2d');
      ctx.drawImage(photo, 0, 0, 4000, 3000);
      const img = ctx.getImageData(0, 0, 4000, 3000);
      let seed = 12345;
      for (let i = 0; i < img.data.length; i += 4) {
        seed = (seed * 1103515245 + 12345) >>> 0;
        const n = ((seed >>> 16) % 17) - 8;
        for (let c = 0; c < 3; c++) img.data[i + c] = Math.min(255, Math.max(0, img.data[i + c] + n));
      }
      ctx.putImageData(img, 0, 0);
      const bytes = new Uint8Array(await (await canvas.convertToBlob({ type: 'image/jpeg', quality: 0.92 })).arrayBuffer());
      let s = '';
      for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return btoa(s);
    });
    writeFileSync(large, Buffer.from(b64, 'base64'));
  }
  const nativeLarge = execFileSync('cargo', ['run', '-q', '-p', 'ov3', '--', 'reconstruct', '--backend', 'cpu', '--image',
    large, '--out', join(outDir, 'large-native.png')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const nativeLargePsnr = Number(/^psnr ([0-9.]+) dB/.exec(nativeLarge)[1]);
  await page.evaluate(() => {
    window.ov3Gaps = [];
    let last = performance.now();
    window.ov3Ticker = setInterval(() => {
      const now = performance.now();
      window.ov3Gaps.push(now - last);
      last = now;
    }, 20);
  });
  before = await runs();
  const tLarge = Date.now();
  await page.setInputFiles('#file', large);
  await waitRun(before);
  const largeMs = Date.now() - tLarge;
  const stall = await page.evaluate(() => {
    clearInterval(window.ov3Ticker);
    return Math.max(...window.ov3Gaps);
  });
  const decoded = (await page.getAttribute('#original', 'data-decoded')) || '';
  const psnrLarge = Number(await page.getAttribute('#psnr-ov3', 'data-value'));
  check(/4000x3000, shrunk to 683x512 by the browser/.test(decoded), `large photo decoded by the browser: "${decoded}"`);
  check(Math.abs(psnrLarge - nativeLargePsnr) < 1.0,
    `large photo: PSNR ${psnrLarge.toFixed(3)} dB vs native ${nativeLargePsnr} dB on all 12 Mpx (within 1.0)`);
  console.log(`large photo: ${largeMs} ms in all (${await text('#timings')}); longest page stall ${stall.toFixed(0)} ms`);

  // 2. A shipped sample: its true caption ranks first, as natively.
  before = await runs();
  await page.click(`#sample-${expected.sample}`);
  await waitRun(before);
  const top = await text('#ranking li:first-child .text');
  check(top === expected.top, `sample ${expected.sample}: top caption "${top}" equals native's "${expected.top}"`);
  check(top === expected.caption, `sample ${expected.sample}: the true caption ranks first`);
  const timingsWarm = await text('#timings');
  console.log(`timings (warm): ${timingsWarm}`);

  // 3. The noise slider re-decodes: at sigma = tau the reconstruction changes.
  const psnrAt0 = Number(await page.getAttribute('#psnr-ov3', 'data-value'));
  await page.$eval('#noise', (el) => {
    el.value = el.max;
    el.dispatchEvent(new Event('input'));
  });
  await page.waitForFunction((p) => Number(document.getElementById('psnr-ov3').dataset.value) !== p, psnrAt0, {
    timeout: 300_000,
  });
  check(true, `slider: PSNR at sigma = tau ${Number(await page.getAttribute('#psnr-ov3', 'data-value')).toFixed(2)} dB (was ${psnrAt0.toFixed(2)})`);
  await page.screenshot({ path: join(outDir, `demo${variant}.png`), fullPage: true });

  // 4. Not an image: a clear message, and the page still works afterwards.
  before = await runs();
  await page.setInputFiles('#file', expected.not_an_image);
  await waitRun(before);
  const msg = await text('#message');
  check(/not an image/.test(msg), `a text file gives a message: "${msg}"`);
  before = await runs();
  await page.click(`#sample-${expected.sample}`);
  await waitRun(before);
  check((await text('#message')) === '' && (await text('#ranking li:first-child .text')) === expected.top, 'the page still works after the bad file');

  // 5. Overlapping requests: an upload still in progress when a sample is picked must never be drawn over it.
  // The photo (the slower of the two) starts first; the sample's result must be the one left on the page.
  before = await runs();
  const started = Date.now();
  await page.setInputFiles('#file', expected.upload);
  await page.click(`#sample-${expected.sample}`);
  await waitRun(before);
  // Give a straggler as long again as the whole overlapped run took, then look.
  await page.waitForTimeout(Math.max(2000, Date.now() - started));
  // Whether the photo finished first (the CPU backend may complete it before the click is handled) or was
  // abandoned (WebGPU), the page must end on the sample: an older result drawn last would show the photo's.
  const finished = (await runs()) - before;
  const shownTop = await text('#ranking li:first-child .text');
  check(shownTop === expected.top, `overlap: the page shows the sample picked last ("${shownTop}"; ${finished} finished)`);

  writeFileSync(
    join(outDir, `timings${variant}.json`),
    JSON.stringify({ backend, load_ms: loadMs, first_image: timings, warm: timingsWarm,
      large_photo: { ms: largeMs, longest_stall_ms: stall, decoded } }, null, 1),
  );
} catch (e) {
  failures.push(String(e));
  console.log(`FAIL ${e}`);
  await page.screenshot({ path: join(outDir, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  await context.close();
}
if (failures.length) {
  console.log(`${failures.length} check(s) failed`);
  process.exit(1);
}
console.log('browser test passed');
