// The page at / (service/page.py): pick or drop images, see what the service says about them.
//
// Every call goes to this service's own HTTP API with the key of the key field as
// `Authorization: Bearer <key>` (service/auth.py): GET /metadata, POST /classify, /embed,
// /search (when an index answers) with the same multipart `images`, and GET /thumbnails/{row}
// for each neighbour (fetched with the key, shown as a blob: URL). Errors are shown as the API
// returns them: a per-image `error` {code, message} on that image's card, a refused request
// ({"error", "code"}) in the status line. No framework, no build step: plain DOM.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const els = {
    key: $("#key"), topK: $("#top-k"), k: $("#k"), drop: $("#drop"), input: $("#images"),
    status: $("#status"), results: $("#results"), model: $("#model"), index: $("#index"),
    template: $("#card-template"),
  };
  const page = {
    metadata: null,   // the last GET /metadata answer (null until one succeeded)
    urls: [],         // blob: URLs of the cards shown, revoked when new ones replace them
    run: 0,           // number of the latest run: answers of older runs are dropped
  };

  function headers() {
    const key = els.key.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // fetch, answering {ok, status, body | blob, error}; `error` is the API's JSON error body
  // ({"error", "code", ...}) or one made up for a network failure / a non-JSON answer
  async function call(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: headers() });
    } catch (err) {
      return { ok: false, status: 0, error: { code: "network", error: String(err) } };
    }
    const type = response.headers.get("content-type") || "";
    if (!response.ok) {
      let error;
      if (type.startsWith("application/json")) {
        error = await response.json().catch(() => null);
      }
      if (!error || typeof error !== "object" || Array.isArray(error)) {
        error = { error: (await response.text().catch(() => "")) || response.statusText };
      }
      return { ok: false, status: response.status, error };
    }
    if (type.startsWith("application/json")) {
      return { ok: true, status: response.status, body: await response.json() };
    }
    return { ok: true, status: response.status, blob: await response.blob() };
  }

  function describe(status, error) {
    const code = error.code ? ` ${error.code}` : "";
    return `${status || "no answer"}${code}: ${error.error || error.message || "failed"}`;
  }

  function setStatus(text, state) {
    els.status.textContent = text;
    els.status.classList.toggle("error", state === "error");
    document.body.dataset.state = state;
  }

  async function loadMetadata() {
    els.model.dataset.state = "loading";
    const answer = await call("/metadata");
    if (!answer.ok) {
      page.metadata = null;
      els.model.textContent = "model: unknown";
      els.index.textContent = "";
      els.model.dataset.state = "error";
      const hint = answer.status === 401 ? " (type the API key above)" : "";
      setStatus(`GET /metadata: ${describe(answer.status, answer.error)}${hint}`, "error");
      return;
    }
    const meta = answer.body;
    page.metadata = meta;
    const classes = meta.class_names || [];
    els.model.textContent = `model ${meta.name}:${meta.version} · ${meta.backbone} · ` +
      `${classes.length} classes (${classes.slice(0, 8).join(", ")}` +
      `${classes.length > 8 ? ", …" : ""})`;
    const index = meta.index;
    if (!index) {
      els.index.textContent = "search is off: no index loaded (CNN_CODES_INDEX)";
    } else if (!index.answers) {
      els.index.textContent = `the index at ${index.folder} does not answer for this model now`;
    } else {
      els.index.textContent = `index: ${index.count} images of ${index.model_name}:` +
        `${index.model_version} (${index.kind}, ${index.layer})`;
    }
    els.model.dataset.state = "ready";
    if (document.body.dataset.state === "error" || !document.body.dataset.state) {
      setStatus("ready: pick or drop images", "ready");
    }
  }

  function searchAnswers() {
    const index = page.metadata && page.metadata.index;
    return Boolean(index && index.answers);
  }

  function form(files, fields) {
    const data = new FormData();
    for (const file of files) data.append("images", file, file.name);
    for (const [name, value] of Object.entries(fields)) data.append(name, String(value));
    return data;
  }

  function bounded(input, low, high, fallback) {
    const value = Number.parseInt(input.value, 10);
    return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
  }

  function sparkline(svg, values) {
    const n = values.length;
    let low = Infinity;
    let high = -Infinity;
    for (const v of values) { low = Math.min(low, v); high = Math.max(high, v); }
    const span = high - low || 1;
    const height = 40;
    svg.setAttribute("viewBox", `0 0 ${Math.max(1, n - 1)} ${height}`);
    const points = values.map((v, i) => `${i},${(height - ((v - low) / span) * height).toFixed(2)}`);
    $("polyline", svg).setAttribute("points", points.join(" "));
    return { low, high };
  }

  function showClasses(card, predictions) {
    const list = $(".classes", card);
    for (const p of predictions) {
      const item = document.createElement("li");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${(p.probability * 100).toFixed(1)}%`;
      bar.append(fill);
      const probability = document.createElement("span");
      probability.className = "probability";
      probability.dataset.value = String(p.probability);
      probability.textContent = `${(p.probability * 100).toFixed(1)} %`;
      item.append(label, bar, probability);
      list.append(item);
    }
  }

  function showCode(card, embed, vector) {
    $(".dim", card).textContent = String(embed.dim);
    const { low, high } = sparkline($(".sparkline", card), vector);
    const zeros = vector.filter((v) => v === 0).length;
    $(".code-info", card).textContent =
      `${embed.layer}, ${embed.dim} values, ${embed.normalized ? "L2-normalised" : "raw"}, ` +
      `min ${low.toFixed(3)}, max ${high.toFixed(3)}, ${zeros} zeros`;
  }

  async function showNeighbors(card, neighbors, run) {
    const list = $(".neighbors", card);
    const items = neighbors.map((n) => {
      const item = document.createElement("li");
      item.dataset.row = String(n.row);
      item.title = n.path;
      const img = document.createElement("img");
      img.alt = n.path.split("/").pop();
      const caption = document.createElement("span");
      caption.className = "score";
      caption.dataset.value = String(n.score);
      caption.textContent = `#${n.rank} · ${n.score.toFixed(3)}`;
      const folder = document.createElement("span");   // ImageFolder data: the label
      folder.className = "folder muted";
      folder.textContent = n.path.split("/").slice(-2, -1)[0] || "";
      item.append(img, caption, folder);
      list.append(item);
      return { item, img, row: n.row };
    });
    await Promise.all(items.map(async ({ item, img, row }) => {
      const answer = await call(`/thumbnails/${encodeURIComponent(row)}`);
      if (run !== page.run) return;
      if (!answer.ok || !answer.blob) {
        const note = document.createElement("span");
        note.className = "thumb-error";
        note.textContent = answer.ok ? "not an image" : describe(answer.status, answer.error);
        item.append(note);
        return;
      }
      const url = URL.createObjectURL(answer.blob);
      page.urls.push(url);
      await new Promise((resolve) => {
        img.addEventListener("load", resolve, { once: true });
        img.addEventListener("error", resolve, { once: true });
        img.src = url;
      });
    }));
  }

  function newCard(file, position) {
    const card = els.template.content.firstElementChild.cloneNode(true);
    card.dataset.index = String(position);
    $(".filename", card).textContent = file.name;
    const preview = $(".preview", card);
    const url = URL.createObjectURL(file);
    page.urls.push(url);
    preview.addEventListener("error", () => { preview.hidden = true; }, { once: true });
    preview.src = url;
    return card;
  }

  function showItemError(card, error) {
    card.classList.add("failed");
    const note = $(".item-error", card);
    note.hidden = false;
    note.dataset.code = error.code;
    note.textContent = `${error.code}: ${error.message}`;
  }

  async function analyse(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    const run = ++page.run;
    for (const url of page.urls) URL.revokeObjectURL(url);
    page.urls = [];
    els.results.replaceChildren();
    setStatus(`sending ${files.length} image${files.length > 1 ? "s" : ""}…`, "loading");
    if (!page.metadata) await loadMetadata();
    const search = searchAnswers();
    const topK = bounded(els.topK, 1, 1000, 5);
    const k = bounded(els.k, 1, 100, 8);
    const [classify, embed, found] = await Promise.all([
      call("/classify", { method: "POST", body: form(files, { top_k: topK }) }),
      call("/embed", { method: "POST", body: form(files, { layer: "embedding" }) }),
      search ? call("/search", { method: "POST", body: form(files, { k }) }) : null,
    ]);
    if (run !== page.run) return;
    const refused = [["/classify", classify], ["/embed", embed], ["/search", found]]
      .filter(([, answer]) => answer && !answer.ok)
      .map(([path, answer]) => `POST ${path}: ${describe(answer.status, answer.error)}`);

    const cards = files.map((file, i) => newCard(file, i));
    els.results.replaceChildren(...cards);
    const pending = [];
    cards.forEach((card, i) => {
      const item = (answer) => (answer && answer.ok ? answer.body.results[i] : null);
      const c = item(classify);
      const e = item(embed);
      const s = item(found);
      const error = (c && c.error) || (e && e.error) || (s && s.error);
      if (error) {
        showItemError(card, error);
        return;
      }
      if (c) showClasses(card, c.predictions);
      else $(".classes-box", card).hidden = true;
      if (e && Array.isArray(e.embedding)) showCode(card, embed.body, e.embedding);
      else $(".code-box", card).hidden = true;
      const note = $(".neighbors-note", card);
      if (s && s.neighbors) {
        note.textContent = `${s.neighbors.length} of ${found.body.index.count} indexed images, ` +
          "cosine similarity";
        pending.push(showNeighbors(card, s.neighbors, run));
      } else if (found) {
        note.textContent = `POST /search: ${describe(found.status, found.error)}`;
      } else {
        note.textContent = "no search index loaded: start the service with CNN_CODES_INDEX";
      }
    });
    await Promise.all(pending);
    if (run !== page.run) return;
    const failed = cards.filter((card) => card.classList.contains("failed")).length;
    if (refused.length) {
      setStatus(refused.join(" · "), "error");
    } else {
      setStatus(`${files.length - failed} of ${files.length} image${files.length > 1 ? "s" : ""}` +
        ` answered${failed ? `, ${failed} refused (see the card)` : ""}`, "done");
    }
    document.body.dataset.finished = String(run);   // every answer of this run is shown
  }

  els.input.addEventListener("change", () => {
    analyse(els.input.files);
    els.input.value = "";   // picking the same file again runs again
  });
  els.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    els.drop.classList.add("over");
  });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
  els.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    els.drop.classList.remove("over");
    analyse(event.dataTransfer.files);
  });
  els.key.addEventListener("change", () => loadMetadata());
  els.key.addEventListener("keydown", (event) => {
    if (event.key === "Enter") loadMetadata();
  });
  document.getElementById("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    loadMetadata();
  });
  loadMetadata();
})();
