// The qwen2vl chat page. Plain JavaScript, no dependencies, nothing from another origin.
// Everything the model writes is put into the page with textContent, never as markup.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"),
    newChat: $("new-chat"),
    settingsToggle: $("settings-toggle"),
    settings: $("settings"),
    apiKey: $("api-key"),
    system: $("system"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    notice: $("notice"),
    conversation: $("conversation"),
    empty: $("empty"),
    composer: $("composer"),
    attachments: $("attachments"),
    file: $("file"),
    attach: $("attach"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    drop: $("drop"),
  };

  // Largest file read into a data URI (the server's default media limit is 48 MiB).
  const MAX_FILE_BYTES = 48 * 1024 * 1024;
  const KEY_STORE = "qwen2vl.apiKey";
  const SETTINGS_STORE = "qwen2vl.settings";

  const state = {
    modelId: null,
    messages: [], // OpenAI chat messages, without the system prompt
    images: [], // every image sent so far: { url, name, number }
    pending: [], // attachments not sent yet: { kind, dataUrl, url, name }
    busy: false,
    controller: null,
  };

  // ---- small helpers -------------------------------------------------------------------

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showNotice(text) {
    el.notice.textContent = text;
    el.notice.hidden = !text;
  }

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function nearBottom() {
    const c = el.conversation;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
  }

  function scrollDown() {
    el.conversation.scrollTop = el.conversation.scrollHeight;
  }

  // The error message of an OpenAI-shaped error body, or a plain description.
  async function errorMessage(resp) {
    let message = "";
    try {
      const body = await resp.json();
      if (body && body.error && typeof body.error.message === "string") {
        message = body.error.message;
      }
    } catch (_) {
      // Not JSON: fall back to the status line.
    }
    if (!message) message = "the server answered HTTP " + resp.status + " " + resp.statusText;
    if (resp.status === 401) message += "\nEnter the server's API key under Settings.";
    if (resp.status === 429) {
      const after = resp.headers.get("Retry-After");
      message += after ? "\nTry again in " + after + " s." : "\nTry again shortly.";
    }
    return message;
  }

  // ---- settings ------------------------------------------------------------------------

  function loadSettings() {
    try {
      el.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
      const s = JSON.parse(sessionStorage.getItem(SETTINGS_STORE) || "{}");
      if (typeof s.system === "string") el.system.value = s.system;
      if (typeof s.maxTokens === "string") el.maxTokens.value = s.maxTokens;
      if (typeof s.temperature === "string") el.temperature.value = s.temperature;
    } catch (_) {
      // Storage may be unavailable; the page works without it.
    }
  }

  function saveSettings() {
    try {
      const key = el.apiKey.value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
      sessionStorage.setItem(
        SETTINGS_STORE,
        JSON.stringify({
          system: el.system.value,
          maxTokens: el.maxTokens.value,
          temperature: el.temperature.value,
        })
      );
    } catch (_) {
      // Ignored, as above.
    }
  }

  function toggleSettings(open) {
    const show = open === undefined ? el.settings.hidden : open;
    el.settings.hidden = !show;
    el.settingsToggle.setAttribute("aria-expanded", String(show));
  }

  // ---- the model -----------------------------------------------------------------------

  async function loadModel() {
    let resp;
    try {
      resp = await fetch("/v1/models", { headers: authHeaders() });
    } catch (_) {
      el.model.textContent = "server unreachable";
      el.model.classList.add("bad");
      showNotice("The server cannot be reached. Is qwen2vl serve still running?");
      return;
    }
    if (!resp.ok) {
      const message = await errorMessage(resp);
      el.model.textContent = resp.status === 401 ? "API key needed" : "model unavailable";
      el.model.classList.add("bad");
      showNotice(message);
      if (resp.status === 401) toggleSettings(true);
      return;
    }
    try {
      const body = await resp.json();
      const card = body && Array.isArray(body.data) ? body.data[0] : null;
      state.modelId = card && typeof card.id === "string" ? card.id : null;
      el.model.textContent = state.modelId || "no model listed";
      el.model.classList.toggle("bad", !state.modelId);
      el.model.title = card && card.max_model_len ? "context " + card.max_model_len + " tokens" : "";
      showNotice("");
    } catch (_) {
      el.model.textContent = "model list unreadable";
      el.model.classList.add("bad");
    }
  }

  // ---- attachments ---------------------------------------------------------------------

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    const problems = [];
    for (const file of Array.from(files || [])) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
      if (!kind) {
        problems.push((file.name || "a file") + " is not an image or a video");
        continue;
      }
      if (file.size > MAX_FILE_BYTES) {
        problems.push((file.name || "a file") + " is larger than 48 MiB");
        continue;
      }
      try {
        const dataUrl = await readDataUrl(file);
        state.pending.push({
          kind,
          dataUrl,
          url: URL.createObjectURL(file),
          name: file.name || (kind === "image" ? "pasted image" : "video"),
        });
      } catch (_) {
        problems.push("cannot read " + (file.name || "a file"));
      }
    }
    showNotice(problems.join("\n"));
    renderPending();
  }

  function renderPending() {
    el.attachments.replaceChildren();
    state.pending.forEach((item, i) => {
      const thumb = make("div", "thumb");
      thumb.title = item.name;
      const media = make(item.kind === "image" ? "img" : "video");
      media.src = item.url;
      if (item.kind === "image") media.alt = item.name;
      else media.muted = true;
      thumb.append(media, make("span", "kind", item.kind));
      const remove = make("button", "remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", "Remove " + item.name);
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(item.url);
        state.pending.splice(i, 1);
        renderPending();
      });
      thumb.append(remove);
      el.attachments.append(thumb);
    });
    el.attachments.hidden = state.pending.length === 0;
  }

  // ---- conversation --------------------------------------------------------------------

  function addBubble(role) {
    el.empty.hidden = true;
    const bubble = make("div", "msg " + role);
    el.conversation.append(bubble);
    return bubble;
  }

  function renderUser(text, items) {
    const bubble = addBubble("user");
    if (items.length) {
      const media = make("div", "media");
      for (const item of items) {
        const m = make(item.kind === "image" ? "img" : "video");
        m.src = item.url;
        if (item.kind === "image") {
          m.alt = item.name;
          m.title = "Image " + item.number + ": " + item.name;
        } else {
          m.controls = true;
          m.muted = true;
          m.title = item.name;
        }
        media.append(m);
      }
      bubble.append(media);
    }
    if (text) bubble.append(make("div", "text", text));
    return bubble;
  }

  function number(v) {
    return typeof v === "number" && isFinite(v) ? v : 0;
  }

  // Model coordinates in [0, 1000) → percent of the image, clamped to it.
  function pct(v) {
    return Math.min(100, Math.max(0, number(v) / 10));
  }

  function placeLabel(frame, text, x, y, color) {
    const label = make("div", "label " + color, text);
    label.style.left = x + "%";
    label.style.top = y + "%";
    if (y < 6) label.classList.add("inside");
    frame.append(label);
  }

  // The image the answer's boxes refer to, with every box and quad drawn over it.
  function renderFigure(bubble, grounding, image) {
    const objects = Array.isArray(grounding.objects) ? grounding.objects : [];
    const shapes = [];
    for (const obj of objects) {
      const label = typeof obj.label === "string" ? obj.label : "";
      for (const b of obj.boxes || []) shapes.push({ kind: "box", label, n: b.number, b });
      for (const q of obj.quads || []) shapes.push({ kind: "quad", label, n: q.number, q });
    }
    if (!shapes.length) return;
    const figure = make("figure", "figure");
    const frame = make("div", "frame");
    const img = make("img");
    img.src = image.url;
    img.alt = "Image " + image.number + " with the answer's boxes";
    frame.append(img);
    let svg = null;
    shapes.forEach((s, i) => {
      const color = "c" + (i % 6);
      const text = (s.n ? "[" + s.n + "] " : "") + (s.label || "");
      if (s.kind === "box") {
        const x1 = pct(Math.min(s.b.x1, s.b.x2));
        const y1 = pct(Math.min(s.b.y1, s.b.y2));
        const x2 = pct(Math.max(s.b.x1, s.b.x2));
        const y2 = pct(Math.max(s.b.y1, s.b.y2));
        const box = make("div", "box " + color);
        box.style.left = x1 + "%";
        box.style.top = y1 + "%";
        box.style.width = x2 - x1 + "%";
        box.style.height = y2 - y1 + "%";
        box.title = text;
        frame.append(box);
        placeLabel(frame, text, x1, y1, color);
      } else {
        if (!svg) {
          // A copy of the page's empty SVG layer (viewBox 0 0 100 100: percent of the image).
          svg = $("quad-layer").content.firstElementChild.cloneNode(true);
          frame.append(svg);
        }
        const points = (s.q.points || []).map((p) => [pct(p[0]), pct(p[1])]);
        const poly = document.createElementNS(svg.namespaceURI, "polygon");
        poly.setAttribute("class", "quad " + color);
        poly.setAttribute("points", points.map((p) => p[0] + "," + p[1]).join(" "));
        svg.append(poly);
        const top = points.reduce((a, p) => (p[1] < a[1] ? p : a), points[0] || [0, 0]);
        placeLabel(frame, text, top[0], top[1], color);
      }
    });
    const caption = make("figcaption", null, "Boxes on image " + image.number + " (" + image.name + ")");
    figure.append(frame, caption);
    bubble.insertBefore(figure, bubble.querySelector(".meta"));
  }

  function usageLine(usage, timing) {
    const d = usage.prompt_tokens_details || {};
    const parts = [
      "prompt " + number(usage.prompt_tokens) + " tokens (text " + number(d.text_tokens) +
        ", image " + number(d.image_tokens) + ", video " + number(d.video_tokens) + ")",
      "completion " + number(usage.completion_tokens) + " tokens",
    ];
    if (timing.tokensPerSecond !== null) parts.push(timing.tokensPerSecond.toFixed(1) + " tokens/s");
    if (timing.firstTokenS !== null) parts.push("first token " + timing.firstTokenS.toFixed(2) + " s");
    return parts.join(" · ");
  }

  // ---- sending -------------------------------------------------------------------------

  function setBusy(busy) {
    state.busy = busy;
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.stop.disabled = !busy;
    el.newChat.disabled = busy;
  }

  function requestBody() {
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.messages);
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    if (state.modelId) body.model = state.modelId;
    const maxTokens = parseInt(el.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const temperature = parseFloat(el.temperature.value);
    if (isFinite(temperature) && temperature >= 0) body.temperature = temperature;
    return body;
  }

  async function send() {
    if (state.busy) return;
    const text = el.prompt.value.trim();
    const items = state.pending.slice();
    if (!text && !items.length) return;
    saveSettings();
    showNotice("");

    // The message as OpenAI content parts: media first, then the question.
    const parts = [];
    for (const item of items) {
      if (item.kind === "image") {
        item.number = state.images.length + 1;
        state.images.push({ url: item.url, name: item.name, number: item.number });
        parts.push({ type: "image_url", image_url: { url: item.dataUrl } });
      } else {
        parts.push({ type: "video_url", video_url: { url: item.dataUrl } });
      }
    }
    if (text) parts.push({ type: "text", text });
    const message = { role: "user", content: items.length ? parts : text };
    const imagesBefore = state.images.length - items.filter((i) => i.kind === "image").length;
    state.messages.push(message);
    state.pending = [];
    renderPending();
    el.prompt.value = "";
    autoGrow();
    const userBubble = renderUser(text, items);
    const image = state.images.length ? state.images[state.images.length - 1] : null;

    const bubble = addBubble("assistant");
    bubble.classList.add("streaming");
    bubble.dataset.state = "waiting";
    const textNode = make("div", "text");
    const meta = make("div", "meta", "waiting for the model…");
    bubble.append(textNode, meta);
    scrollDown();

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let content = "";
    let pieces = 0;
    let grounding = null;
    let usage = null;
    let finish = null;
    let streamError = null;
    const t0 = performance.now();
    let tFirst = null;

    // A failed request leaves no trace in the conversation: the text and files come back.
    const unsend = (why) => {
      state.messages.pop();
      state.images.length = imagesBefore;
      userBubble.remove();
      bubble.remove();
      el.empty.hidden = state.messages.length > 0;
      if (!el.prompt.value) {
        el.prompt.value = text;
        autoGrow();
      }
      state.pending = items.concat(state.pending);
      renderPending();
      showNotice(why);
    };

    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!resp.ok) {
        const why = await errorMessage(resp);
        if (resp.status === 401) toggleSettings(true);
        unsend(why);
        return;
      }
      bubble.dataset.state = "streaming";
      meta.textContent = "";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        const lines = buffer.split(/\r?\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            done = true;
            break;
          }
          let event;
          try {
            event = JSON.parse(data);
          } catch (_) {
            continue;
          }
          if (event.error) {
            streamError = event.error.message || "the model failed";
            continue;
          }
          if (event.usage) usage = event.usage;
          const choice = Array.isArray(event.choices) ? event.choices[0] : null;
          if (!choice) continue;
          const delta = choice.delta || {};
          if (typeof delta.content === "string" && delta.content) {
            if (tFirst === null) tFirst = performance.now();
            const follow = nearBottom();
            content += delta.content;
            pieces += 1;
            textNode.textContent = content;
            if (follow) scrollDown();
          }
          if (delta.grounding) grounding = delta.grounding;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (err) {
      if (err && err.name === "AbortError") {
        bubble.dataset.state = "stopped";
      } else if (!content) {
        unsend("The request failed: " + (err && err.message ? err.message : err) +
          "\nIs the server still running?");
        return;
      } else {
        streamError = "the connection was lost: " + (err && err.message ? err.message : err);
      }
    } finally {
      state.controller = null;
      setBusy(false);
      bubble.classList.remove("streaming");
    }

    const tEnd = performance.now();
    if (bubble.dataset.state === "streaming" && !finish && !streamError) {
      streamError = "the answer ended early: the server closed the stream";
    }
    if (content) state.messages.push({ role: "assistant", content });
    if (grounding && typeof grounding.text === "string") textNode.textContent = grounding.text;
    if (grounding && image) renderFigure(bubble, grounding, image);

    if (bubble.dataset.state === "stopped") {
      meta.textContent = "stopped by you after " + pieces + " pieces (" +
        ((tEnd - t0) / 1000).toFixed(1) + " s); the partial answer is kept";
    } else if (streamError) {
      bubble.dataset.state = "error";
      bubble.append(make("div", "error", streamError));
      meta.textContent = "";
    } else {
      bubble.dataset.state = "done";
      if (usage) {
        const n = number(usage.completion_tokens);
        const span = tFirst !== null && n > 1 ? (tEnd - tFirst) / 1000 : (tEnd - t0) / 1000;
        const timing = {
          tokensPerSecond: span > 0 ? (tFirst !== null && n > 1 ? n - 1 : n) / span : null,
          firstTokenS: tFirst !== null ? (tFirst - t0) / 1000 : null,
        };
        meta.textContent = usageLine(usage, timing);
        meta.classList.add("usage");
        const d = usage.prompt_tokens_details || {};
        meta.dataset.promptTokens = String(number(usage.prompt_tokens));
        meta.dataset.imageTokens = String(number(d.image_tokens));
        meta.dataset.videoTokens = String(number(d.video_tokens));
        meta.dataset.completionTokens = String(n);
      }
      if (finish === "length") meta.textContent += " · cut at max tokens";
    }
    if (!content && !streamError && bubble.dataset.state === "done") textNode.textContent = "(empty answer)";
    scrollDown();
    el.prompt.focus();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    if (state.busy) return;
    for (const img of state.images) URL.revokeObjectURL(img.url);
    state.messages = [];
    state.images = [];
    el.conversation.replaceChildren(el.empty);
    el.empty.hidden = false;
    showNotice("");
    el.prompt.focus();
  }

  function autoGrow() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight + 2, 200) + "px";
  }

  // ---- wiring --------------------------------------------------------------------------

  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  el.prompt.addEventListener("input", autoGrow);
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.attach.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    addFiles(el.file.files).finally(() => {
      el.file.value = "";
    });
  });
  el.settingsToggle.addEventListener("click", () => toggleSettings());
  el.apiKey.addEventListener("change", () => {
    saveSettings();
    loadModel();
  });
  for (const input of [el.system, el.maxTokens, el.temperature]) {
    input.addEventListener("change", saveSettings);
  }

  document.addEventListener("paste", (e) => {
    const files = e.clipboardData ? Array.from(e.clipboardData.files || []) : [];
    const media = files.filter((f) => f.type.startsWith("image/") || f.type.startsWith("video/"));
    if (media.length) {
      e.preventDefault();
      addFiles(media);
    }
  });

  let dragDepth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    el.drop.hidden = false;
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.drop.hidden = true;
  });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    el.drop.hidden = true;
    addFiles(e.dataTransfer.files);
  });

  loadSettings();
  setBusy(false);
  loadModel();
  el.prompt.focus();
})();
