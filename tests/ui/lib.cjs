// Shared by the web UI's tests and benchmark: a real `decap serve` over a
// folder of build scripts made for the occasion.
"use strict";
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const readline = require("node:readline");

const TOKEN = "ui-test-token";
const BIN = process.env.DECAP_BIN;
const CHROMIUM = process.env.DECAP_CHROMIUM || "/usr/bin/chromium";

function project(root, key, descriptor, script) {
  const dir = path.join(root, key);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, "project.json"), JSON.stringify(descriptor));
  fs.writeFileSync(path.join(dir, "build.sh"), script);
}

// Starts decap over the projects `setup(scriptsDir)` writes; resolves to
// { url, child, root }.
async function serve(setup) {
  if (!BIN) { throw new Error("set DECAP_BIN to the decap binary"); }
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "decap-ui-"));
  let child = null;
  // Gone however the run ends (a failure, an exception, a signal).
  process.on("exit", () => {
    if (child && child.exitCode === null) { child.kill("SIGKILL"); }
    fs.rmSync(root, { recursive: true, force: true });
  });
  for (const sig of ["SIGINT", "SIGTERM"]) { process.on(sig, () => process.exit(130)); }
  const scripts = path.join(root, "scripts");
  setup(scripts);
  child = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--data-dir", path.join(root, "data"),
    "--scripts", scripts, "--sandbox", "auto", "--kill-grace-secs", "1"], {
    // A webhook secret, so that its absence is not warned of; the builds
    // end with the server, which then clears what they left.
    env: { ...process.env, DECAP_API_TOKEN: TOKEN, DECAP_LOG: "warn",
      DECAP_GITHUB_WEBHOOK_SECRET: "ui-tests", DECAP_STOP_BUILDS_ON_EXIT: "true" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  // What decap says is kept, and shown only when a test fails
  // (`serverLogs`): the warnings that tests of failures bring about on
  // purpose stay out of a green run.
  readline.createInterface({ input: child.stderr }).on("line", (l) => logs.push(l));
  const url = await new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout });
    lines.on("line", (l) => { if (l.startsWith("decap: serving ")) { resolve(l.slice(15)); } });
    child.on("exit", (c) => reject(new Error("decap exited with " + c)));
    setTimeout(() => reject(new Error("decap did not start in 30 s")), 30000);
  });
  return { url, child, root };
}

// Stops decap as an operator would (SIGTERM) and waits until it is gone,
// so that it clears what its builds left; killed after 20 s.
function stop(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) { resolve(); return; }
    const timer = setTimeout(() => child.kill("SIGKILL"), 20000);
    child.on("exit", () => { clearTimeout(timer); resolve(); });
    child.kill("SIGTERM");
  });
}

// Every line the servers of this run wrote to their standard error.
const logs = [];
function serverLogs() { return logs.join("\n"); }

module.exports = { TOKEN, BIN, CHROMIUM, project, serve, stop, serverLogs };
