// How soon a line printed by build.sh shows in the browser: a build prints
// 300 lines, 40 ms apart, each stamped with the moment it was printed; the
// build page, open in Debian's chromium, notes when each line appears.
//
//   DECAP_BIN=target/release/decap NODE_PATH=~/.cache/decap/ui-playwright-core-1.65.1/node_modules \
//     node tests/ui/bench.cjs
"use strict";
const { chromium } = require("playwright-core");
const { TOKEN, CHROMIUM, project, serve, stop } = require("./lib.cjs");

(async () => {
  const lines = 300;
  const decap = await serve((scripts) => {
    project(scripts, "bench/chatty", { buildImage: "x" },
      `sleep 3\ni=1\nwhile [ $i -le ${lines} ]; do echo "line $i $(date +%s%3N)"; sleep 0.04; i=$((i+1)); done\n`);
  });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  const page = await browser.newPage();
  const r = await fetch(decap.url + "/api/v1/builds/bench/chatty?branch=main", {
    method: "POST", headers: { authorization: "Bearer " + TOKEN },
  });
  const id = (await r.json()).builds[0].id;
  await page.goto(decap.url + "/builds/" + id);
  await page.evaluate(() => {
    window.__seen = [];
    const pre = document.getElementById("console");
    new MutationObserver(() => {
      const at = Date.now();
      const all = pre.textContent.split("\n").filter((l) => l.startsWith("line "));
      for (let i = window.__seen.length; i < all.length; i++) { window.__seen.push([all[i], at]); }
    }).observe(pre, { childList: true, subtree: true, characterData: true });
  });
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 120000 });
  const seen = await page.evaluate(() => window.__seen);
  const ms = seen.map(([l, at]) => at - Number(l.split(" ")[2])).sort((a, b) => a - b);
  const pct = (p) => ms[Math.min(ms.length - 1, Math.round((ms.length - 1) * p))];
  const once = new Set(seen.map(([l]) => l.split(" ")[1])).size;
  console.log(`line printed by build.sh → shown in chromium: n=${ms.length} (${once} distinct of ${lines}) ` +
    `p50=${pct(0.5)} ms p99=${pct(0.99)} ms max=${ms[ms.length - 1]} ms`);
  await browser.close();
  await stop(decap.child);
})().catch((e) => { console.error(e); process.exit(1); });
