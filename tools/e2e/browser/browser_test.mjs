// End-to-end test of the chat page in headless Chromium, against `qwen2vl serve` with the
// tiny fixture model.
//
// 1. A server whose answers are scripted (debug builds: QWEN2VL_TEST_SCRIPTED_ANSWER) to a
//    grounded box plus literal HTML: upload an image with the file button, drop and paste
//    more (then remove them), ask, and check the streamed answer, that the HTML stays text,
//    the box and its label over the image, the usage line with image tokens.
// 2. A server with an API key and the real model: the page asks for the key, then a long
//    answer is stopped with the Stop button; the partial answer stays, the server lets the
//    request go, and the page answers the next question.
//
// Environment: QWEN2VL_BIN (default target/debug/qwen2vl), CHROMIUM (default
// /usr/bin/chromium), E2E_OUT (screenshot path, default target/e2e/page.png; the narrow-window
// and Stop screenshots go beside it as page-narrow.png and page-stop.png).

import { spawn } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const BIN = process.env.QWEN2VL_BIN || path.join(ROOT, "target/debug/qwen2vl");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOT = path.resolve(process.env.E2E_OUT || path.join(ROOT, "target/e2e/page.png"));
const MODEL = "tests/fixtures/tiny-qwen2vl"; // relative to ROOT, the servers' directory
// What /v1/models and the page show for it: the directory's name, never its path.
const MODEL_NAME = "tiny-qwen2vl";
const IMAGE = path.join(ROOT, "tests/fixtures/images/photo640.png");
const SMALL = path.join(ROOT, "tests/fixtures/images/small.png");
const VIDEO = path.join(ROOT, "tests/fixtures/video/clip.mp4");

const HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b>';
const SCRIPTED =
  "Here is <|object_ref_start|>the cat<|object_ref_end|>" +
  "<|box_start|>(100,200),(500,800)<|box_end|> on the left and " +
  "<|object_ref_start|>the sign<|object_ref_end|>" +
  "<|quad_start|>(600,100),(900,150),(880,400),(580,350)<|quad_end|>. Also: " + HOSTILE + " done.";
const API_KEY = "e2e-secret";

const servers = [];
let browser = null;

function fail(message) {
  throw new Error(message);
}

function check(cond, message) {
  if (!cond) fail(message);
}

function log(message) {
  console.log("browser e2e: " + message);
}

// Starts `qwen2vl serve --port 0` and resolves with its base URL once it prints it.
function startServer(name, extraArgs, extraEnv) {
  const env = Object.assign({}, process.env, extraEnv);
  if (!extraEnv.QWEN2VL_TEST_SCRIPTED_ANSWER) delete env.QWEN2VL_TEST_SCRIPTED_ANSWER;
  delete env.QWEN2VL_API_KEY;
  const args = ["serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0", ...extraArgs];
  const child = spawn(BIN, args, { cwd: ROOT, env, stdio: ["ignore", "ignore", "pipe"] });
  servers.push(child);
  let stderr = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${name} server printed no address in 120 s; stderr:\n${stderr}`)),
      120000
    );
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (d) => {
      stderr += d;
      const m = stderr.match(/serving .* on (http:\/\/\S+)\r?\n/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${BIN}: ${e.message}`));
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${name} server exited (${code ?? signal}); stderr:\n${stderr}`));
    });
  });
}

function stopServers() {
  for (const child of servers) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
  }
}

// A page that records what would mean a broken or unsafe page: script errors, policy
// violations, requests to anything but its own server.
async function openPage(base) {
  const context = await browser.newContext({ viewport: { width: 900, height: 1100 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource.* (400|401)/.test(m.text())) {
      problems.push("console error: " + m.text());
    }
  });
  page.on("request", (r) => {
    const url = r.url();
    if (!url.startsWith(base + "/") && !url.startsWith("data:") && !url.startsWith("blob:")) {
      problems.push("request to another origin: " + url);
    }
  });
  await page.goto(base + "/");
  const chats = [];
  page.on("request", (r) => {
    if (r.url().endsWith("/v1/chat/completions")) chats.push(JSON.parse(r.postData()));
  });
  return { page, problems, context, chats };
}

function assertNoProblems(problems, what) {
  check(problems.length === 0, `${what}: ${problems.join("\n")}`);
}

async function scriptedAnswer() {
  const base = await startServer("scripted", [], { QWEN2VL_TEST_SCRIPTED_ANSWER: SCRIPTED });
  log("scripted server at " + base);
  const { page, problems, context } = await openPage(base);

  await page.waitForFunction(
    (m) => document.getElementById("model").textContent === m,
    MODEL_NAME,
    { timeout: 20000 }
  ).catch(async () =>
    fail("model name not shown; header says: " + (await page.textContent("#model")))
  );

  // Drop and paste attach too; the × removes an attachment.
  const small = readFileSync(SMALL).toString("base64");
  const transfer = () =>
    page.evaluateHandle((b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], "small.png", { type: "image/png" }));
      return dt;
    }, small);
  await page.dispatchEvent("#conversation", "drop", { dataTransfer: await transfer() });
  await page.waitForSelector(".thumb >> nth=0", { timeout: 5000 });
  const pasted = await transfer();
  await page.evaluate((dt) => {
    document.getElementById("prompt").dispatchEvent(
      new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true })
    );
  }, pasted);
  await page.waitForFunction(() => document.querySelectorAll(".thumb").length === 2, null, {
    timeout: 5000,
  }).catch(() => fail("a pasted image was not attached"));
  await page.click(".thumb button");
  await page.click(".thumb button");
  check((await page.locator(".thumb").count()) === 0, "removing attachments left thumbnails");
  check(await page.isHidden("#attachments"), "the empty attachment strip is still shown");

  // The file button's input.
  await page.setInputFiles("#file", IMAGE);
  await page.waitForSelector(".thumb img", { timeout: 5000 });

  // Record how the answer grows, to see it stream.
  await page.evaluate(() => {
    window.__lengths = [];
    new MutationObserver(() => {
      const t = document.querySelector(".msg.assistant .text");
      if (t) window.__lengths.push(t.textContent.length);
    }).observe(document.getElementById("conversation"), {
      subtree: true,
      childList: true,
      characterData: true,
    });
  });
  await page.fill("#prompt", "Where is the cat?");
  await page.press("#prompt", "Enter");
  await page.waitForSelector('.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]', {
    timeout: 120000,
  }).catch(async () => fail("no finished answer; notice: " + (await page.textContent("#notice"))));
  const answer = page.locator(".msg.assistant").last();
  check((await answer.getAttribute("data-state")) === "done",
    "the answer failed: " + (await answer.textContent()));

  const text = await answer.locator(".text").textContent();
  check(text.includes("the cat"), "answer text missing (is " + BIN + " a debug build, " +
    "with the scripted-answer hook?): " + JSON.stringify(text));
  check(text.includes(HOSTILE), "the literal markup is not shown as text: " + JSON.stringify(text));
  check(!text.includes("<|box_start|>"), "grounding markup shown raw: " + JSON.stringify(text));
  check((await answer.locator(".text *").count()) === 0, "the answer text contains elements");
  check((await page.locator('img[src="x"], .msg b').count()) === 0, "model markup became elements");
  check(await page.evaluate(() => window.__pwned === undefined), "window.__pwned was set");
  const lengths = await page.evaluate(() => [...new Set(window.__lengths.filter((n) => n > 0))]);
  check(lengths.length >= 3, "the answer did not stream in pieces: lengths " + lengths);

  // The box over the image: 0-1000 model coordinates → the displayed image.
  const img = answer.locator(".figure img");
  await img.waitFor({ timeout: 5000 }).catch(() => fail("no image with boxes in the answer"));
  await page.waitForFunction(() => {
    const i = document.querySelector(".msg.assistant .figure img");
    return i && i.complete && i.naturalWidth > 0;
  });
  check((await answer.locator(".box").count()) === 1, "expected one box");
  const label = await answer.locator(".label").first().textContent();
  check(label.includes("the cat"), "box label: " + JSON.stringify(label));
  const ib = await img.boundingBox();
  const bb = await answer.locator(".box").first().boundingBox();
  const near = (a, b) => Math.abs(a - b) <= 3;
  check(
    near(bb.x, ib.x + 0.1 * ib.width) && near(bb.y, ib.y + 0.2 * ib.height) &&
      near(bb.width, 0.4 * ib.width) && near(bb.height, 0.6 * ib.height),
    `box at ${JSON.stringify(bb)} is not (100,200)-(500,800) of the image at ${JSON.stringify(ib)}`
  );

  // The quad: an SVG polygon over the same image, with its label.
  check((await answer.locator(".quad").count()) === 1, "expected one quad");
  const labels = await answer.locator(".label").allTextContents();
  check(labels.length === 2 && labels[1].includes("the sign"), "labels: " + JSON.stringify(labels));
  // The layer covers the image exactly; in its percent units the quad spans 58..90, 10..40.
  const sb = await answer.locator(".frame svg").boundingBox();
  check(near(sb.x, ib.x) && near(sb.y, ib.y) && near(sb.width, ib.width) &&
    near(sb.height, ib.height), `the quad layer ${JSON.stringify(sb)} is not over the image`);
  const qb = await answer.locator(".quad").first().evaluate((p) => {
    const b = p.getBBox();
    return { x: b.x, y: b.y, width: b.width, height: b.height };
  });
  const close = (a, b) => Math.abs(a - b) < 0.01;
  check(close(qb.x, 58) && close(qb.width, 32) && close(qb.y, 10) && close(qb.height, 30),
    `quad at ${JSON.stringify(qb)} (percent) is not (580..900, 100..400)`);

  // Usage with image tokens.
  const usage = answer.locator(".usage");
  check((await usage.count()) === 1, "no usage line");
  const imageTokens = Number(await usage.getAttribute("data-image-tokens"));
  check(imageTokens > 0, "image tokens not > 0: " + (await usage.textContent()));
  const usageText = await usage.textContent();
  check(/image \d+/.test(usageText) && /tokens\/s/.test(usageText), "usage line: " + usageText);
  check(await page.isVisible("#send"), "Send is not back after the answer");
  check(await page.isHidden("#stop"), "Stop still shown after the answer");

  assertNoProblems(problems, "scripted page");
  mkdirSync(path.dirname(SHOT), { recursive: true });
  await page.screenshot({ path: SHOT, fullPage: true });
  log(`answer streamed (${lengths.length} sizes), markup stayed text, box and label placed, ` +
    `${imageTokens} image tokens; screenshot ${SHOT}`);

  // A phone-sized window: nothing sticks out sideways, the box still fits its image.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(200);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - innerWidth);
  check(overflow <= 0, "the page is wider than a narrow window by " + overflow + " px");
  const ib2 = await img.boundingBox();
  const bb2 = await answer.locator(".box").first().boundingBox();
  check(near(bb2.x, ib2.x + 0.1 * ib2.width) && near(bb2.width, 0.4 * ib2.width),
    "the box did not follow the resized image");
  const narrowShot = SHOT.replace(/(\.png)?$/, "-narrow.png");
  await page.screenshot({ path: narrowShot });
  await context.close();
}

async function runningSequences(base) {
  const r = await fetch(base + "/metrics", { headers: { Authorization: "Bearer " + API_KEY } });
  const m = (await r.text()).match(/^qwen2vl_running_sequences (\d+)/m);
  return m ? Number(m[1]) : -1;
}

async function stopButton() {
  const base = await startServer("real", ["--api-key", API_KEY], {});
  log("real-model server with an API key at " + base);
  const { page, problems, context, chats } = await openPage(base);

  // Without the key the page says so, politely, and opens the settings.
  await page.waitForFunction(() => document.getElementById("model").textContent === "API key needed",
    null, { timeout: 20000 })
    .catch(async () => fail("no API-key hint; header says: " + (await page.textContent("#model"))));
  const notice = await page.textContent("#notice");
  check(/API key/.test(notice) && (await page.isVisible("#notice")), "401 notice: " + notice);
  check(await page.isVisible("#api-key"), "the settings did not open for the key");
  await page.fill("#api-key", API_KEY);
  await page.press("#api-key", "Tab");
  await page.waitForFunction((m) => document.getElementById("model").textContent === m,
    MODEL_NAME, { timeout: 20000 }).catch(() => fail("the page did not accept the API key"));
  check(await page.isHidden("#notice"), "the notice stayed after the key was given");

  // A 4xx from the server: its message is shown, and the question comes back to be edited.
  await page.fill("#max-tokens", "999999");
  await page.fill("#prompt", "Too long?");
  await page.press("#prompt", "Enter");
  await page.waitForSelector("#notice:not([hidden])", { timeout: 20000 })
    .catch(() => fail("no notice for a request the server refused"));
  const refused = await page.textContent("#notice");
  check(/max_tokens 999999 is over the model's context/.test(refused), "400 notice: " + refused);
  check((await page.inputValue("#prompt")) === "Too long?", "the refused question was not restored");
  check((await page.locator(".msg").count()) === 0, "the refused turn stayed in the conversation");
  check(await page.isVisible("#send"), "Send not back after a refusal");

  await page.fill("#max-tokens", "30000");
  await page.fill("#temperature", "0");
  await page.fill("#prompt", "Tell me a very long story.");
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => {
    const t = document.querySelector(".msg.assistant .text");
    return t && t.textContent.length > 40;
  }, null, { timeout: 60000 }).catch(() => fail("the long answer did not start streaming"));
  check(await page.isVisible("#stop"), "no Stop button while streaming");
  check((await runningSequences(base)) === 1, "the server is not running the request");
  await page.click("#stop");
  const answer = page.locator(".msg.assistant").last();
  await page.waitForSelector('.msg.assistant[data-state="stopped"]', { timeout: 5000 })
    .catch(async () => fail("not stopped; state " + (await answer.getAttribute("data-state"))));
  const partial = await answer.locator(".text").textContent();
  check(partial.length > 40, "the partial answer was not kept");
  await page.waitForTimeout(1000);
  check((await answer.locator(".text").textContent()) === partial, "the answer grew after Stop");
  check(/stopped/.test(await answer.locator(".meta").textContent()), "no 'stopped' note");
  check(await page.isVisible("#send") && await page.isHidden("#stop"), "Send not back after Stop");

  // The server let the request go.
  let running = -1;
  for (let i = 0; i < 50; i++) {
    running = await runningSequences(base);
    if (running === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  check(running === 0, "the server still runs the stopped request: " + running);

  // The page is usable again: the next question gets a whole answer.
  await page.fill("#max-tokens", "8");
  await page.fill("#prompt", "And a short one?");
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => {
    const all = document.querySelectorAll(".msg.assistant");
    return all.length === 2 && ["done", "error"].includes(all[1].dataset.state);
  }, null, { timeout: 60000 }).catch(() => fail("no answer after Stop"));
  const second = page.locator(".msg.assistant").last();
  check((await second.getAttribute("data-state")) === "done",
    "the answer after Stop failed: " + (await second.textContent()));
  check(Number(await second.locator(".usage").getAttribute("data-completion-tokens")) > 0,
    "no completion tokens after Stop");
  // The stopped turn stays in the conversation: the next request sends it back.
  const history = chats[chats.length - 1].messages;
  check(history.length === 3 && history[1].role === "assistant" && history[1].content === partial,
    "the partial answer is not in the next request: " + JSON.stringify(history).slice(0, 300));
  const long = chats[chats.length - 2];
  check(long.stream === true && long.stream_options.include_usage === true &&
    long.max_tokens === 30000 && long.temperature === 0, "request settings: " +
    JSON.stringify(Object.assign({}, long, { messages: undefined })));

  const stopShot = SHOT.replace(/(\.png)?$/, "-stop.png");
  await page.screenshot({ path: stopShot, fullPage: true });
  log(`stopped after ${partial.length} characters; server idle again; next answer fine; ` +
    `screenshot ${stopShot}`);

  // New chat, then a video from the file button.
  await page.click("#new-chat");
  check((await page.locator(".msg").count()) === 0, "New chat left messages");
  await page.setInputFiles("#file", VIDEO);
  await page.waitForSelector(".thumb video", { timeout: 5000 });
  check((await page.textContent(".thumb .kind")) === "video", "the video thumbnail is not marked");
  await page.fill("#prompt", "What happens in the video?");
  await page.press("#prompt", "Enter");
  await page.waitForSelector('.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]',
    { timeout: 60000 }).catch(async () =>
    fail("no answer about the video; notice: " + (await page.textContent("#notice"))));
  const about = page.locator(".msg.assistant").last();
  check((await about.getAttribute("data-state")) === "done",
    "the video answer failed: " + (await about.textContent()));
  const videoTokens = Number(await about.locator(".usage").getAttribute("data-video-tokens"));
  check(videoTokens > 0, "video tokens not > 0: " + (await about.locator(".usage").textContent()));
  check((await page.locator(".msg.user video").count()) === 1, "the sent video is not shown");
  const videoPart = chats[chats.length - 1].messages[0].content[0];
  check(videoPart.type === "video_url" && videoPart.video_url.url.startsWith("data:video/mp4;base64,"),
    "the video was not sent as a data URI");
  log(`a video from the file button: ${videoTokens} video tokens`);

  assertNoProblems(problems, "stop page");
  await context.close();
}

async function main() {
  // No sandbox: it cannot start as root or in most containers, and this browser only ever
  // loads the page of a server this script started.
  const args = ["--no-first-run", "--no-default-browser-check", "--disable-gpu", "--no-sandbox"];
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args });
  await scriptedAnswer();
  await stopButton();
}

for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143]]) {
  process.on(signal, () => {
    stopServers();
    process.exit(code);
  });
}

try {
  await main();
  log("all checks passed");
} catch (e) {
  console.error("browser e2e: FAILED: " + (e && e.message ? e.message : e));
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
  stopServers();
}
