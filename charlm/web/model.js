// charlm's model in the page: the embedding, RNN/LSTM/GRU layers and output layer of a CharRNN,
// one character per step, with PyTorch's gate order and equations, and the sampler.
// No dependency and no network: the weights come from the page's own data blocks.
//
//   nn.RNN : h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
//   nn.LSTM: gates in the order i, f, g, o;  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')
//   nn.GRU : gates in the order r, z, n;  r = s(W_ir x + b_ir + W_hr h + b_hr), z likewise,
//            n = tanh(W_in x + b_in + r (W_hn h + b_hn));  h' = (1 - z) n + z h
//
// As charlm's Stepper, the first layer's input projection of every character is precomputed
// into a (V, G*H) table (embedding @ W_ih0^T + b_ih0, plus b_hh0 except for the GRU, whose reset
// gate scales b_hn), so layer 0 costs one matrix-vector product per step. Weights are kept as
// Float32Arrays; sums are accumulated in double precision (JavaScript numbers).
(function () {
  "use strict";
  const GATES = { rnn: 1, lstm: 4, gru: 3 };
  const MAX_LENGTH = 10000000;

  // ------------------------------------------------------------------ weights
  function base64Bytes(text) {
    const bin = atob(text.replace(/\s+/g, ""));
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  let HALF = null; // the 65,536 fp16 values as float32, built on first use
  function halfTable() {
    if (HALF) return HALF;
    HALF = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) {
      const sign = i & 0x8000 ? -1 : 1;
      const exp = (i >> 10) & 0x1f;
      const frac = i & 0x3ff;
      let v;
      if (exp === 0) v = frac * Math.pow(2, -24);
      else if (exp === 31) v = frac ? NaN : Infinity;
      else v = (1 + frac / 1024) * Math.pow(2, exp - 15);
      HALF[i] = sign * v;
    }
    return HALF;
  }

  // One tensor of the blob as a Float32Array (dequantized: exactly what PyTorch is checked on).
  function tensor(bytes, t) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Float32Array(n);
    if (t.dtype === "f32") {
      for (let i = 0; i < n; i++) out[i] = view.getFloat32(t.offset + 4 * i, true);
    } else if (t.dtype === "f16") {
      const table = halfTable();
      for (let i = 0; i < n; i++) out[i] = table[view.getUint16(t.offset + 2 * i, true)];
    } else if (t.dtype === "i8") {
      const cols = t.shape.length > 1 ? t.shape[1] : 1;
      const rows = n / cols;
      for (let r = 0; r < rows; r++) {
        const scale = view.getFloat32(t.scales + 4 * r, true);
        for (let c = 0; c < cols; c++) out[r * cols + c] = view.getInt8(t.offset + r * cols + c) * scale;
      }
    } else {
      throw new Error("unknown tensor type " + t.dtype);
    }
    return out;
  }

  // out[r] = bias[r] + sum_c W[r, c] x[c]   (W row-major, rows x cols). The plain loop: in V8
  // it ran about 2x faster than one unrolled into 4 accumulators (measured in Chromium).
  function matvec(W, rows, cols, x, bias, biasAt, out) {
    for (let r = 0; r < rows; r++) {
      const base = r * cols;
      let s = 0;
      for (let c = 0; c < cols; c++) s += W[base + c] * x[c];
      out[r] = (bias ? bias[biasAt + r] : 0) + s;
    }
  }

  const sigmoid = (x) => 1 / (1 + Math.exp(-x));

  class Model {
    constructor(meta, bytes) {
      const cell = meta.cell;
      if (!(cell in GATES)) throw new Error("unknown cell " + cell);
      this.meta = meta;
      this.cell = cell;
      this.E = meta.embed_size;
      this.H = meta.hidden_size;
      this.L = meta.num_layers;
      this.G = GATES[cell];
      this.vocab = meta.vocab; // one string per id: a whole code point (a surrogate pair for astral ones)
      this.V = this.vocab.length;
      this.ids = new Map(this.vocab.map((ch, i) => [ch, i]));
      const w = {};
      for (const t of meta.tensors) w[t.name] = tensor(bytes, t);
      const V = this.V, E = this.E, H = this.H, GH = this.G * this.H;
      // The table: embed @ W_ih0^T + b_ih0 (+ b_hh0 except GRU), one row of G*H per character.
      this.table = new Float32Array(V * GH);
      const emb = w["embed.weight"], wih0 = w["rnn.weight_ih_l0"], bih0 = w["rnn.bias_ih_l0"],
        bhh0 = w["rnn.bias_hh_l0"];
      const row = new Float64Array(GH);
      for (let v = 0; v < V; v++) {
        const x = emb.subarray(v * E, (v + 1) * E);
        for (let j = 0; j < GH; j++) {
          let s = 0;
          for (let e = 0; e < E; e++) s += wih0[j * E + e] * x[e];
          row[j] = s + bih0[j] + (cell === "gru" ? 0 : bhh0[j]);
        }
        this.table.set(row, v * GH);
      }
      this.layers = [];
      for (let k = 0; k < this.L; k++) {
        this.layers.push({
          wih: k ? w["rnn.weight_ih_l" + k] : null, bih: w["rnn.bias_ih_l" + k],
          whh: w["rnn.weight_hh_l" + k], bhh: w["rnn.bias_hh_l" + k],
        });
      }
      this.headW = w["head.weight"];
      this.headB = w["head.bias"];
      this.gi = new Float32Array(GH);
      this.gh = new Float32Array(GH);
      this.logits = new Float32Array(V);
    }

    zeroState() {
      const s = { h: [], c: [] };
      for (let k = 0; k < this.L; k++) {
        s.h.push(new Float32Array(this.H));
        if (this.cell === "lstm") s.c.push(new Float32Array(this.H));
      }
      return s;
    }

    // One character: updates state in place; returns this.logits (overwritten by the next step).
    step(id, state) {
      const H = this.H, GH = this.G * H, cell = this.cell;
      const gi = this.gi, gh = this.gh;
      let x = null;
      for (let k = 0; k < this.L; k++) {
        const layer = this.layers[k];
        const h = state.h[k];
        let giArr = gi, giAt = 0;
        if (k === 0) {
          giArr = this.table;
          giAt = id * GH;
        } else {
          matvec(layer.wih, GH, H, x, layer.bih, 0, gi);
        }
        // Layer 0 of RNN/LSTM has b_hh folded into the table; the GRU keeps it apart.
        const bhh = k === 0 && cell !== "gru" ? null : layer.bhh;
        matvec(layer.whh, GH, H, h, bhh, 0, gh);
        if (cell === "lstm") {
          const c = state.c[k];
          for (let j = 0; j < H; j++) {
            const i = sigmoid(giArr[giAt + j] + gh[j]);
            const f = sigmoid(giArr[giAt + H + j] + gh[H + j]);
            const g = Math.tanh(giArr[giAt + 2 * H + j] + gh[2 * H + j]);
            const o = sigmoid(giArr[giAt + 3 * H + j] + gh[3 * H + j]);
            c[j] = f * c[j] + i * g;
            h[j] = o * Math.tanh(c[j]);
          }
        } else if (cell === "gru") {
          for (let j = 0; j < H; j++) {
            const r = sigmoid(giArr[giAt + j] + gh[j]);
            const z = sigmoid(giArr[giAt + H + j] + gh[H + j]);
            const n = Math.tanh(giArr[giAt + 2 * H + j] + r * gh[2 * H + j]);
            h[j] = (1 - z) * n + z * h[j];
          }
        } else {
          for (let j = 0; j < H; j++) h[j] = Math.tanh(giArr[giAt + j] + gh[j]);
        }
        x = h;
      }
      matvec(this.headW, this.V, H, x, this.headB, 0, this.logits);
      return this.logits;
    }

    // The ids of a prompt, by code point; a character outside the vocabulary is an error.
    encode(prompt) {
      const ids = [];
      const missing = [];
      for (const ch of String(prompt)) {
        const id = this.ids.get(ch);
        if (id === undefined) {
          if (!missing.includes(ch)) missing.push(ch);
        } else ids.push(id);
      }
      if (missing.length) {
        throw new Error("the prompt has characters not in the model's vocabulary: " +
          missing.slice(0, 20).map((c) => JSON.stringify(c)).join(", "));
      }
      return ids;
    }

    // The ids the state is warmed on: the prompt, or a newline (or id 0) when it is empty,
    // as charlm's sampler does.
    startIds(prompt) {
      const ids = this.encode(prompt);
      if (ids.length) return ids;
      return [this.ids.has("\n") ? this.ids.get("\n") : 0];
    }
  }

  // ------------------------------------------------------------------ sampler
  // A seeded generator: splitmix64-style mixing of the seed into xoshiro128** state.
  function rng(seed) {
    let s;
    if (seed === null || seed === undefined) {
      s = new Uint32Array(4);
      if (globalThis.crypto && crypto.getRandomValues) crypto.getRandomValues(s);
      else for (let i = 0; i < 4; i++) s[i] = (Math.random() * 2 ** 32) >>> 0;
    } else {
      let x = BigInt.asUintN(64, BigInt(seed));
      s = new Uint32Array(4);
      for (let i = 0; i < 4; i += 2) {
        x = BigInt.asUintN(64, x + 0x9e3779b97f4a7c15n);
        let z = x;
        z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
        z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
        z = z ^ (z >> 31n);
        s[i] = Number(z & 0xffffffffn);
        s[i + 1] = Number(z >> 32n);
      }
      if (!(s[0] | s[1] | s[2] | s[3])) s[0] = 1;
    }
    const rotl = (x, k) => (x << k) | (x >>> (32 - k));
    return function () { // uniform in [0, 1)
      const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
      const t = s[1] << 9;
      s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
      s[2] ^= t; s[3] = rotl(s[3], 11);
      return result / 4294967296;
    };
  }

  function softmax(logits, temperature) {
    const V = logits.length;
    const p = new Float64Array(V);
    let max = -Infinity;
    for (let i = 0; i < V; i++) max = Math.max(max, logits[i] / temperature);
    let sum = 0;
    for (let i = 0; i < V; i++) sum += (p[i] = Math.exp(logits[i] / temperature - max));
    for (let i = 0; i < V; i++) p[i] /= sum;
    return p;
  }

  // The next id: the most likely at temperature 0 (the first on a tie, as torch.argmax),
  // else a draw from softmax(logits / temperature) limited to the top_k most likely and to
  // the smallest set whose probability reaches top_p (the most likely always stays).
  function pick(logits, temperature, topK, topP, random) {
    const V = logits.length;
    if (temperature === 0) {
      let best = 0;
      for (let i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
      return best;
    }
    const keep = new Uint8Array(V).fill(1);
    if (topK > 0 && topK < V) {
      const kth = Array.from(logits).sort((a, b) => b - a)[topK - 1];
      for (let i = 0; i < V; i++) if (logits[i] < kth) keep[i] = 0;
    }
    const scaled = new Float64Array(V);
    for (let i = 0; i < V; i++) scaled[i] = keep[i] ? logits[i] : -Infinity;
    let p = softmax(scaled, temperature);
    if (topP < 1) {
      const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a]);
      let cum = 0;
      for (let n = 0; n < V; n++) {
        const i = order[n];
        if (n > 0 && cum >= topP) keep[i] = 0;
        cum += p[i];
      }
      for (let i = 0; i < V; i++) if (!keep[i]) p[i] = 0;
    }
    let total = 0;
    for (let i = 0; i < V; i++) total += p[i];
    let u = random() * total;
    let last = 0;
    for (let i = 0; i < V; i++) {
      if (p[i] <= 0) continue;
      last = i;
      u -= p[i];
      if (u < 0) return i;
    }
    return last;
  }

  // Yield to the browser between slices of work (a message is not clamped like setTimeout).
  function nextTask() {
    return new Promise((resolve) => {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => { channel.port1.close(); resolve(); };
      channel.port2.postMessage(null);
    });
  }
  const SLICE_MS = 15;

  function checkOptions(o) {
    const opts = Object.assign({ length: 500, temperature: 1, top_k: 0, top_p: 1, seed: null, stop: [] }, o || {});
    const isInt = (v) => typeof v === "number" && Number.isInteger(v);
    if (!isInt(opts.length) || opts.length < 0 || opts.length > MAX_LENGTH) {
      throw new Error("length must be an integer in [0, " + MAX_LENGTH + "]; got " + opts.length);
    }
    if (typeof opts.temperature !== "number" || !(opts.temperature >= 0 && opts.temperature <= 100)) {
      throw new Error("temperature must be in [0, 100]; got " + opts.temperature);
    }
    if (!isInt(opts.top_k) || opts.top_k < 0) throw new Error("top_k must be an integer >= 0; got " + opts.top_k);
    if (typeof opts.top_p !== "number" || !(opts.top_p > 0 && opts.top_p <= 1)) {
      throw new Error("top_p must be in (0, 1]; got " + opts.top_p);
    }
    if (opts.seed !== null && opts.seed !== undefined && (!isInt(opts.seed) || opts.seed < 0)) {
      throw new Error("seed must be an integer >= 0; got " + opts.seed);
    }
    let stop = opts.stop === null || opts.stop === undefined ? [] : opts.stop;
    if (typeof stop === "string") stop = [stop];
    if (!Array.isArray(stop) || stop.some((s) => typeof s !== "string")) {
      throw new Error("stop must be a string or a list of strings");
    }
    opts.stop = stop.filter((s) => s.length > 0);
    return opts;
  }

  // Generate: warm on the prompt, then draw opts.length characters (fewer when a stop text
  // ends the text: it ends right after its first stop text). onText(chunk) streams the text;
  // an aborted signal ends it early. Resolves to the generated text, prompt excluded.
  async function generate(model, prompt, options, onText, signal) {
    const opts = checkOptions(options);
    const ids = model.startIds(prompt);
    const random = rng(opts.seed);
    const state = model.zeroState();
    const longestStop = opts.stop.reduce((m, s) => Math.max(m, s.length), 0);
    let logits = null;
    let sliceStart = performance.now();
    for (let i = 0; i < ids.length; i++) {
      logits = model.step(ids[i], state);
      if (performance.now() - sliceStart > SLICE_MS) {
        await nextTask();
        if (signal && signal.aborted) return "";
        sliceStart = performance.now();
      }
    }
    const parts = [];
    let chunk = "";
    let tail = "";
    for (let n = 0; n < opts.length; n++) {
      const id = pick(logits, opts.temperature, opts.top_k, opts.top_p, random);
      const ch = model.vocab[id];
      chunk += ch;
      if (longestStop) {
        tail = (tail + ch).slice(-(longestStop + 2));
        if (opts.stop.some((s) => tail.endsWith(s))) break;
      }
      if (n + 1 === opts.length) break; // the last character needs no step
      logits = model.step(id, state);
      if (performance.now() - sliceStart > SLICE_MS) {
        parts.push(chunk);
        if (onText) onText(chunk);
        chunk = "";
        await nextTask();
        if (signal && signal.aborted) return parts.join("");
        sliceStart = performance.now();
      }
    }
    if (chunk) {
      parts.push(chunk);
      if (onText) onText(chunk);
    }
    return parts.join("");
  }

  // The next-character distribution after the prompt: [[character, probability], ...] in
  // vocabulary order.
  async function probs(model, prompt) {
    const ids = model.startIds(prompt);
    const state = model.zeroState();
    let logits = null;
    let sliceStart = performance.now();
    for (const id of ids) {
      logits = model.step(id, state);
      if (performance.now() - sliceStart > SLICE_MS) {
        await nextTask();
        sliceStart = performance.now();
      }
    }
    const p = softmax(logits, 1);
    return model.vocab.map((ch, i) => [ch, p[i]]);
  }

  window.charlmModel = { Model, generate, probs, pick, rng, tensor };

  // ---------------------------------------------------------- the exported page
  const metaBlock = document.getElementById("charlm-model");
  const weightsBlock = document.getElementById("charlm-weights");
  if (!metaBlock || !weightsBlock) return;
  let model = null;
  let failure = null;
  try {
    const meta = JSON.parse(metaBlock.textContent);
    model = new Model(meta, base64Bytes(weightsBlock.textContent));
  } catch (e) {
    failure = new Error("the model in this page cannot be read: " + (e && e.message || e));
  }
  const ready = () => (failure ? Promise.reject(failure) : Promise.resolve(model));
  const card = () => ready().then((m) => Object.assign({}, m.meta.card));
  window.charlm = {
    card,
    generate: (prompt, options) => ready().then((m) => {
      const o = Object.assign({}, options || {});
      const onText = o.onText, signal = o.signal;
      delete o.onText;
      delete o.signal;
      return generate(m, prompt, o, onText, signal);
    }),
    probs: (prompt) => ready().then((m) => probs(m, prompt)),
    get model() { return model; },
  };
  window.charlmBackend = {
    card,
    generate: (prompt, options, onText, signal) => ready().then((m) => generate(m, prompt, options, onText, signal)),
  };
})();
