// Decap's web UI in a real browser: Debian's chromium driven by
// playwright-core, against the real `decap` binary on the embedded default.
//
//   DECAP_BIN=…/decap node tests/ui/ui.test.cjs
//
// tests/run installs playwright-core (under ~/.cache/decap) and chromium,
// and runs this. Each test opens its pages fresh; a console error or a
// failed request fails the test; a screenshot of each page it saw is saved
// under $DECAP_UI_SCREENSHOTS.
"use strict";
const { chromium } = require("playwright-core");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { execFileSync } = require("node:child_process");
const { TOKEN, BIN, CHROMIUM, project, serve, stop, serverLogs } = require("./lib.cjs");

// A git repository beside the scripts, for a preset project: test.sh prints
// and ends with `exitCode`.
function presetProject(scripts, key, exitCode) {
  const repo = path.join(scripts, "..", "repos", key.replace("/", "-"));
  fs.mkdirSync(repo, { recursive: true });
  fs.writeFileSync(path.join(repo, "test.sh"), "echo 'the tests run'\nexit " + exitCode + "\n");
  const git = (...args) => execFileSync("git", args, { cwd: repo, stdio: "ignore" });
  git("init", "-q", "-b", "main", ".");
  git("add", "-A");
  git("-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "one");
  const dir = path.join(scripts, key);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, "project.json"), JSON.stringify({ language: "shell", repoUrl: repo }));
}

const SHOTS = process.env.DECAP_UI_SCREENSHOTS || path.join(os.tmpdir(), "decap-ui-screenshots");

async function startDecap() {
  return serve((scripts) => {
    project(scripts, "acme/live", { buildImage: "x", repoDescription: "Prints slowly" },
      "printf '\\033[32mgreen line\\033[0m\\n'\nfor i in 1 2 3 4 5 6; do echo \"line $i\"; sleep 0.4; done\n" +
      "echo '<script>window.__xss = 1</script>'\nmkdir -p \"$ARTIFACTS_DIR/out\"\necho report > \"$ARTIFACTS_DIR/out/report.txt\"\n");
    project(scripts, "acme/slow", { buildImage: "x" }, "echo holding the lock\nsleep 60\n");
    // A pipeline whose test fails its first attempt and whose deploy waits
    // for Promote.
    project(scripts, "acme/flow", { buildImage: "x" }, "echo built > \"$ARTIFACTS_DIR/app.txt\"\n");
    const flow = path.join(scripts, "acme/flow");
    fs.writeFileSync(path.join(flow, "pipeline.json"), JSON.stringify({ stages: [
      { name: "build", script: "build.sh" },
      { name: "test", script: "test.sh" },
      { name: "deploy", script: "deploy.sh", manual: true },
    ] }));
    fs.writeFileSync(path.join(flow, "test.sh"),
      "grep -q built \"$DECAP_INPUTS/build/app.txt\"\n[ \"$DECAP_ATTEMPT\" -ge 2 ] || { echo flaky; exit 3; }\necho tested\n");
    fs.writeFileSync(path.join(flow, "deploy.sh"), "echo deployed\n");
    presetProject(scripts, "acme/preset", 0);
    presetProject(scripts, "acme/presetfails", 4);
    project(scripts, "acme/evil", {
      buildImage: "x",
      repoDescription: "<script>window.__xss = 2</script><img src=x onerror=\"window.__xss=3\">",
    }, "echo fine\n");
  });
}

function watch(page, allowed) {
  const problems = [];
  page.on("console", (m) => {
    if (m.type() === "error" && !(allowed || []).some((a) => m.text().includes(a))) {
      problems.push("console error: " + m.text());
    }
  });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("requestfailed", (r) => {
    const f = r.failure() ? r.failure().errorText : "";
    // An event stream closed by leaving the page is not a failure.
    if (f.includes("ERR_ABORTED") && r.url().includes("/events")) { return; }
    problems.push("request failed: " + r.url() + " " + f);
  });
  return problems;
}

async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) { return v; }
    if (Date.now() > end) { throw new Error("timed out waiting for " + what); }
    await new Promise((r) => setTimeout(r, 100));
  }
}

function check(cond, msg) { if (!cond) { throw new Error(msg); } }

async function login(page, url) {
  await page.goto(url + "/login");
  await page.fill("#token", TOKEN);
  await Promise.all([page.waitForURL(url + "/"), page.click("form[action='/login'] button")]);
  check(await page.isVisible("text=Log out"), "logged in: the header offers Log out");
}

async function buildBranch(page, url, proj, branch) {
  await page.goto(url + "/projects/acme/" + proj);
  await page.fill("#branch", branch);
  await Promise.all([page.waitForURL(/\/builds\//), page.click("form.inline button:has-text('Build')")]);
  return page.url().split("/builds/")[1];
}

async function api(url, method, p, body) {
  const r = await fetch(url + p, {
    method, headers: { authorization: "Bearer " + TOKEN, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  return r.status === 204 ? null : r.json();
}

const tests = [];
function test(name, fn, allowed) { tests.push({ name, fn, allowed }); }

test("the dashboard opens and lists what runs, waits and ended", async (page, url, shot) => {
  await page.goto(url + "/");
  check(await page.isVisible("h1:has-text('Dashboard')"), "dashboard heading");
  check(await page.isVisible("text=Nothing is running."), "nothing runs yet");
  await shot("dashboard-empty");
  await page.click("nav >> text=Projects");
  await page.waitForURL(url + "/projects");
  check(await page.isVisible("a:has-text('live')"), "the projects page lists acme/live");
  await shot("projects");
});

test("log in with a wrong token, then the right one, then out", async (page, url, shot) => {
  await page.goto(url + "/login");
  await page.fill("#token", "wrong");
  await page.click("form[action='/login'] button");
  await page.waitForSelector("text=That is not the API token.");
  await shot("login-wrong");
  await login(page, url);
  await shot("logged-in");
  await page.click("text=Log out");
  await page.waitForSelector("header >> text=Log in");
}, ["401"]);

test("build a branch from the project page, watch it live, download an artifact, rerun it", async (page, url, shot) => {
  await login(page, url);
  const id = await buildBranch(page, url, "live", "main");
  // Lines appear while the build runs.
  await page.waitForSelector("#console:has-text('line 2')", { timeout: 20000 });
  const midway = await page.textContent("#build-status");
  check(midway.includes("running"), "still running while the first lines show: " + midway);
  check(!(await page.textContent("#console")).includes("line 6"), "not all lines are there yet");
  await shot("build-live");
  // It finishes, and the page shows the result and the artifacts.
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 30000 });
  await page.waitForSelector("text=out/report.txt", { timeout: 15000 });
  const text = await page.textContent("#console");
  for (let i = 1; i <= 6; i++) {
    check(text.split("\n").filter((l) => l === "line " + i).length === 1, "line " + i + " shown exactly once");
  }
  check(await page.isVisible("#console span.a32"), "ANSI green is rendered as colour");
  check(text.includes("<script>window.__xss = 1</script>"), "HTML in a log line is shown as text");
  check((await page.evaluate(() => window.__xss)) === undefined, "no script from the log ran");
  await shot("build-finished");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("text=out/report.txt")]);
  const file = await download.path();
  check(fs.readFileSync(file, "utf8") === "report\n", "the artifact downloads whole");
  await Promise.all([page.waitForURL((u) => u.pathname.startsWith("/builds/") && !u.pathname.endsWith(id)),
    page.click("button:has-text('Rerun')")]);
  check(!page.url().endsWith(id), "a rerun is a new build");
  await page.waitForSelector("text=a rerun of");
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 30000 });
  await shot("rerun");
});

test("a pipeline is drawn before it runs; rerun it from the failed stage, then promote the manual one", async (page, url, shot) => {
  await login(page, url);
  await page.goto(url + "/projects/acme/flow");
  for (const s of ["build", "test", "deploy"]) {
    check(await page.isVisible("ol.pipeline >> text=" + s), "stage " + s + " is drawn before any run");
  }
  check(await page.isVisible("text=waits for Promote"), "the manual stage says it waits for Promote");
  await shot("pipeline-before");
  const first = await buildBranch(page, url, "flow", "main");
  const runs = await api(url, "GET", "/api/v1/pipelines/acme/flow");
  const run = runs.runs[0].id;
  check(runs.runs[0].stages[0].attempts[0].id === first, "the Build button started the run's first stage");
  const state = async () => {
    const r = await api(url, "GET", "/api/v1/pipeline-runs/" + run);
    return r.stages.map((s) => s.status).join(",");
  };
  await until("the test stage to fail", async () => (await state()) === "succeeded,failed,pending", 30000);
  await page.goto(url + "/projects/acme/flow");
  const row = page.locator("table.runs tbody tr").first();
  check((await row.locator("td.stage").count()) === 3, "the run is a row of three stage boxes");
  check(await row.locator("td.stage.s-failed").isVisible(), "the failed stage shows failed");
  check((await row.locator("td.stage").nth(2).textContent()).includes("pending"), "deploy, not yet run, shows pending");
  check((await row.locator("button:has-text('Promote')").count()) === 0, "nothing to promote while test has failed");
  await shot("pipeline-failed");
  await Promise.all([page.waitForURL(/\/builds\//),
    page.click("button[aria-label='Rerun run " + run + " from test']")]);
  const rerun = page.url().split("/builds/")[1];
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 30000 });
  await until("deploy to wait for Promote", async () => (await state()) === "succeeded,succeeded,waiting", 30000);
  await page.goto(url + "/projects/acme/flow");
  check(await row.locator("text=attempt 2").isVisible(), "the rerun is the test stage's second attempt");
  check((await row.locator("td.stage").nth(1).locator("a").getAttribute("href")) === "/builds/" + rerun,
    "the test box links to its latest attempt");
  await shot("pipeline-waiting");
  await Promise.all([page.waitForURL(/\/builds\//),
    page.click("button[aria-label='Promote deploy of run " + run + "']")]);
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 30000 });
  check((await page.textContent("#console")).includes("deployed"), "the promoted stage ran its script");
  await until("the run to succeed", async () => (await api(url, "GET", "/api/v1/pipeline-runs/" + run)).status === "succeeded", 30000);
  await page.goto(url + "/projects/acme/flow");
  check(await row.locator("th .status.s-succeeded").isVisible(), "the run shows succeeded");
  check((await row.locator("button:has-text('Promote')").count()) === 0, "no Promote once deployed");
  check((await api(url, "GET", "/api/v1/pipeline-runs/" + run)).stages[1].attempts.length === 2, "both attempts of test are kept");
  const figures = page.locator("table.figures tbody tr").nth(1);
  const figureText = await figures.textContent();
  check(figureText.includes("1 run, 2 attempts") && figureText.includes("50 %"),
    "test's figures count both its attempts, the failed one among them: " + figureText);
  check(await page.isVisible("section:has(h2:has-text('History')) >> text=test (attempt 2)"),
    "the history names each build's stage");
  await shot("pipeline-done");
});

test("a preset build folds its phases in the console and lists them", async (page, url, shot) => {
  await login(page, url);
  await page.goto(url + "/projects/acme/preset");
  await page.waitForSelector("#preset-h:has-text('The shell preset')");
  check((await page.textContent("table.phases")).includes("sh ./test.sh"), "the project page lists the preset's commands");
  await shot("preset-project");
  await buildBranch(page, url, "preset", "main");
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 30000 });
  await page.waitForSelector("#console details.section >> nth=2", { timeout: 15000 });
  const sections = await page.$$eval("#console details.section",
    (ds) => ds.map((d) => ({ open: d.open, summary: d.querySelector("summary").textContent })));
  check(sections.length === 3, "three sections: " + JSON.stringify(sections));
  check(sections.every((s) => !s.open), "passed phases are folded: " + JSON.stringify(sections));
  check(sections[2].summary.startsWith("── phase test: passed in "), "the summary says how it went: " + sections[2].summary);
  check(!(await page.isVisible("text=the tests run")), "a folded phase hides its lines");
  await page.click("#console details.section >> nth=2 >> summary");
  await page.waitForSelector("text=the tests run");
  await page.waitForSelector("#phases-h");
  check((await page.textContent("table.phases")).includes("passed"), "the phases table shows each outcome");
  await shot("preset-build");
  await buildBranch(page, url, "presetfails", "main");
  await page.waitForSelector("#build-status:has-text('failed')", { timeout: 30000 });
  await page.waitForSelector("#console details.section.failed", { timeout: 15000 });
  const failed = await page.$eval("#console details.section.failed", (d) => ({ open: d.open, summary: d.querySelector("summary").textContent }));
  check(failed.open && failed.summary.includes("failed (exit code 4)"), "the failed phase stays open: " + JSON.stringify(failed));
  check(await page.isVisible("text=the tests run"), "its lines show");
  await shot("preset-failed");
});

test("remove a deferred build from the queue page", async (page, url, shot) => {
  await login(page, url);
  await page.goto(url + "/queue");
  page.once("dialog", (d) => d.accept());
  await page.click("button:has-text('Close the queue')");
  await page.waitForSelector("text=The queue is closed");
  const id = await buildBranch(page, url, "evil", "main");
  await page.waitForSelector("#build-status:has-text('deferred')");
  await page.goto(url + "/queue");
  check(await page.isVisible(`a[href='/builds/${id}']`), "the deferred build is listed");
  await shot("queue-deferred");
  page.once("dialog", (d) => d.accept());
  await page.click(`form[action='/ui/deferred/${id}/remove'] button`);
  await page.waitForSelector("text=Nothing waits.");
  page.once("dialog", (d) => d.accept());
  await page.click("button:has-text('Open the queue')");
  await page.waitForSelector("text=The queue is open");
  await shot("queue-open");
});

test("unlock a held lock, then cancel its build", async (page, url, shot) => {
  await login(page, url);
  const id = await buildBranch(page, url, "slow", "main");
  // Its time counts up while it runs.
  await page.waitForSelector("#took");
  const took = await page.textContent("#took");
  await until("the running time to count up", async () => (await page.textContent("#took")) !== took, 5000);
  await page.waitForSelector("#console:has-text('holding the lock')", { timeout: 20000 });
  await page.goto(url + "/queue");
  await page.waitForSelector("code:has-text('acme/slow/main')");
  await shot("locks");
  // Declining the confirmation changes nothing.
  page.once("dialog", (d) => d.dismiss());
  await page.click("form[action='/ui/locks/unlock'] button");
  await page.waitForTimeout(300);
  check(await page.isVisible("code:has-text('acme/slow/main')"), "a dismissed unlock keeps the lock");
  page.once("dialog", (d) => d.accept());
  await page.click("form[action='/ui/locks/unlock'] button");
  await page.waitForSelector("text=No lock is held.");
  await page.goto(url + "/builds/" + id);
  page.once("dialog", (d) => d.accept());
  await page.click("button:has-text('Cancel')");
  await page.waitForSelector("#build-status:has-text('cancelled')", { timeout: 20000 });
  await shot("cancelled");
});

test("HTML in descriptions and branch names is escaped", async (page, url, shot) => {
  await login(page, url);
  await page.goto(url + "/projects");
  check(await page.isVisible("text=<script>window.__xss = 2</script>"), "the description shows as text");
  await buildBranch(page, url, "evil", "<b>bold</b>");
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 20000 });
  check(await page.isVisible("h1:has-text('<b>bold</b>')"), "the branch name shows as text");
  await page.goto(url + "/projects/acme/evil");
  check((await page.evaluate(() => window.__xss)) === undefined, "no injected script ran");
  await shot("escaped");
});

test("a build whose log is gone says so", async (page, url, shot, decap) => {
  const built = await api(url, "POST", "/api/v1/builds/acme/evil?branch=gone");
  const id = built.builds[0].id;
  await until("the build to end", async () => {
    const b = await (await fetch(url + "/api/v1/build/" + id)).json();
    return b.status === "succeeded";
  });
  fs.rmSync(path.join(decap.root, "data", "blobs", id, "console.log.gz"));
  await page.goto(url + "/builds/" + id);
  await page.waitForSelector("text=the console log is gone");
  await shot("log-gone");
});

test("unknown pages and builds get a friendly 404", async (page, url, shot) => {
  const r = await page.goto(url + "/builds/01a207a1-5040-7355-989f-9dabfedbee02");
  check(r.status() === 404, "a 404 status");
  check(await page.isVisible("text=There is no such build"), "it says so");
  await shot("not-found");
  const r2 = await page.goto(url + "/no/such/page");
  check(r2.status() === 404 && (await page.isVisible("h1:has-text('Not found')")), "a page for browsers");
}, ["404"]);

test("a lost live connection resumes without repeating lines", async (page, url, shot) => {
  await login(page, url);
  const built = await api(url, "POST", "/api/v1/builds/acme/live?branch=main");
  const id = built.builds[0].id;
  await page.goto(url + "/builds/" + id);
  await page.waitForSelector("#console:has-text('line 2')", { timeout: 20000 });
  // Cut the connection: the browser reconnects with Last-Event-ID.
  await page.context().setOffline(true);
  await page.waitForTimeout(1200);
  await page.context().setOffline(false);
  await page.waitForSelector("#build-status:has-text('succeeded')", { timeout: 40000 });
  await page.waitForSelector("text=out/report.txt", { timeout: 15000 });
  const lines = (await page.textContent("#console")).split("\n");
  for (let i = 1; i <= 6; i++) {
    check(lines.filter((l) => l === "line " + i).length === 1, "line " + i + " once after reconnecting");
  }
  await shot("resumed");
}, ["ERR_INTERNET_DISCONNECTED", "ERR_NETWORK_CHANGED"]);

// What reads as something gone wrong, on a page a new user sees.
const ALARMING = /\b(error|could not|cannot|unable|failed to|panic)\b/i;

test("every page of a fresh Decap on the shipped examples reads as healthy", async (page, _url, shot) => {
  const examples = path.join(__dirname, "..", "..", "examples", "build-scripts");
  const fresh = await serve((scripts) => fs.cpSync(examples, scripts, { recursive: true }));
  try {
    const url = fresh.url;
    const keys = fs.readdirSync(path.join(examples, "examples")).map((p) => "examples/" + p);
    // One build of each, as a new user would start them.
    const ids = [];
    for (const key of keys) {
      const r = await fetch(`${url}/api/v1/builds/${key}?branch=main`, {
        method: "POST", headers: { authorization: "Bearer " + TOKEN },
      });
      check(r.status === 202, key + ": " + r.status);
      ids.push((await r.json()).builds[0].id);
    }
    for (const id of ids) {
      await until("build " + id + " to end", async () => {
        const b = await (await fetch(`${url}/api/v1/build/${id}`)).json();
        return !["queued", "deferred", "running"].includes(b.status);
      }, 60000);
    }
    const pages = ["/", "/projects", "/queue", "/login"]
      .concat(keys.map((k) => "/projects/" + k))
      .concat(ids.map((id) => "/builds/" + id));
    for (const p of pages) {
      await page.goto(url + p);
      await page.waitForLoadState("networkidle");
      const alerts = await page.locator(".problem, [role=alert]").allTextContents();
      check(alerts.length === 0, p + " shows a problem: " + alerts.join(" | "));
      // The console of a build is the build's own words (always-fails
      // says it failed); the page around it is Decap's.
      const text = await page.evaluate(() => {
        const c = document.querySelector("#console");
        if (c) { c.remove(); }
        return document.body.innerText;
      });
      const m = text.match(ALARMING);
      check(!m, p + " reads \"" + (m && m[0]) + "\": " + text.slice(Math.max(0, text.search(ALARMING) - 80), text.search(ALARMING) + 80));
      await shot(p.replace(/[^a-z0-9]+/gi, "-"));
    }
  } finally {
    await stop(fresh.child);
  }
});

(async () => {
  check(BIN, "set DECAP_BIN to the decap binary");
  fs.mkdirSync(SHOTS, { recursive: true });
  const decap = await startDecap();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  let passed = 0, failed = 0;
  for (const t of tests) {
    const context = await browser.newContext({ acceptDownloads: true });
    const page = await context.newPage();
    const problems = watch(page, t.allowed);
    const slug = t.name.replace(/[^a-z0-9]+/gi, "-").toLowerCase().slice(0, 50);
    const shot = (name) => page.screenshot({ path: path.join(SHOTS, slug + "--" + name + ".png"), fullPage: true });
    try {
      await t.fn(page, decap.url, shot, decap);
      if (t.allowed === undefined || !t.allowed.includes("requestfailed")) {
        // Offline on purpose makes requests fail; other tests must have none.
        const real = problems.filter((p) => !(t.allowed || []).some((a) => p.includes(a)));
        check(real.length === 0, real.join("\n"));
      }
      console.log("test ui::" + slug + " ... ok");
      passed++;
    } catch (e) {
      console.log("test ui::" + slug + " ... FAILED\n  " + String(e.stack || e).split("\n").join("\n  "));
      await shot("failure").catch(() => {});
      failed++;
    }
    await context.close();
  }
  await browser.close();
  await stop(decap.child);
  fs.rmSync(decap.root, { recursive: true, force: true });
  if (failed) { console.log("decap's own messages:\n" + serverLogs()); }
  console.log(`test result: ${failed ? "FAILED" : "ok"}. ${passed} passed; ${failed} failed (screenshots in ${SHOTS})`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(1); });
