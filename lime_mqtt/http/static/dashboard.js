// The lime-mqtt dashboard: the cluster's state pushed by the bridge as server-sent events
// (/api/events), and a chat box that streams an answer from /v1/chat/completions.
// No framework and nothing fetched from the internet: this file is the whole of it.
"use strict";

const COLORS = ["#2f7d6d", "#7d5a2f", "#2f4f7d", "#7d2f5e", "#5e7d2f", "#4f2f7d", "#7d2f2f", "#2f6a7d"];
let model = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function mb(value) { return value == null ? "-" : `${Math.round(value)} MB`; }
function ms(value) { return value == null ? "-" : `${value.toFixed(1)} ms`; }

function bar(fraction, label) {
  const inner = el("span");
  inner.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return el("span", {}, el("span", { class: "bar" }, inner), " ", label);
}

function renderDevices(devices) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...devices.map((d) => {
    const used = d.rss_mb != null && d.baseline_mb != null ? d.rss_mb - d.baseline_mb : null;
    const link = d.link_rtt_ms != null ? `${d.link_rtt_ms.toFixed(2)} ms, ${Math.round(d.link_mb_s)} MB/s` : "-";
    return el("tr", { "data-device": d.id, "data-state": d.state },
      el("td", {}, d.id + (d.trusted ? " (trusted)" : "")),
      el("td", { class: `state state-${d.state}` }, d.online ? d.state : "offline"),
      el("td", {}, d.memory_mb ? bar(used / d.memory_mb, `${mb(used)} / ${mb(d.memory_mb)}`) : mb(used)),
      el("td", {}, d.kv_tokens ?? "-"),
      el("td", {}, d.busy == null ? "-" : bar(d.busy, `${Math.round(d.busy * 100)}%`)),
      el("td", {}, link),
      el("td", {}, d.stages.length ? `stage ${d.stages.join(", ")}` : "-"));
  }));
}

function renderPlan(plan, planner) {
  const box = document.getElementById("plan");
  document.getElementById("plan-title").textContent =
    plan ? `epoch ${plan.epoch}: ${plan.model}, ${plan.num_layers} layers${plan.ready ? "" : " (loading)"}` : "none";
  box.replaceChildren(...(plan ? plan.stages.map((s, i) => {
    const layers = [];
    for (let layer = s.start; layer < s.stop; layer++) {
      layers.push(el("span", { class: s.streamed.includes(layer) ? "layer streamed" : "layer", title: `layer ${layer}` }));
    }
    const node = el("div", { class: "stage", "data-stage": s.stage, "data-device": s.device },
      `${s.stage}: ${s.device} [${s.start}, ${s.stop})${s.streamed.length ? `, ${s.streamed.length} streamed` : ""}`,
      el("div", { class: "layers" }, ...layers));
    node.style.flexGrow = String(s.stop - s.start);
    node.style.background = COLORS[i % COLORS.length];
    return node;
  }) : []));
  document.getElementById("planner").textContent = planner ? `planner: ${planner.state}: ${planner.message}` : "";
}

function renderRequests(coordinators) {
  document.getElementById("requests").replaceChildren(...coordinators.map((c) => el("p", { "data-coordinator": c.name },
    `${c.name} serves ${c.model}: ${c.running ?? "-"} in flight, ${c.waiting ?? "-"} waiting, ${c.served ?? "-"} served`
    + (Object.keys(c.errors).length ? `, errors ${JSON.stringify(c.errors)}` : ""))));
  const recent = coordinators.flatMap((c) => c.recent).sort((a, b) => b.ts - a.ts).slice(0, 10);
  document.querySelector("#recent tbody").replaceChildren(...recent.map((r) => el("tr", {},
    el("td", {}, new Date(r.ts * 1000).toLocaleTimeString()), el("td", {}, r.tokens),
    el("td", {}, ms(r.ttft_ms)), el("td", {}, ms(r.tpot_ms)))));
  if (!model && coordinators.length) model = coordinators[0].model;
}

function render(state) {
  document.getElementById("cluster").textContent = state.cluster;
  renderDevices(state.devices);
  renderPlan(state.plan, state.planner);
  renderRequests(state.coordinators);
}

function follow() {
  const status = document.getElementById("connection");
  const events = new EventSource("/api/events");
  events.onopen = () => { status.textContent = "live"; status.classList.add("live"); };
  events.onmessage = (event) => render(JSON.parse(event.data));
  events.onerror = () => { status.textContent = "reconnecting"; status.classList.remove("live"); };
}

async function ask(event) {
  event.preventDefault();
  const question = document.getElementById("chat-input").value.trim();
  const answer = document.getElementById("chat-answer");
  const status = document.getElementById("chat-status");
  if (!question) return;
  const key = document.getElementById("chat-key").value;
  sessionStorage.setItem("lime-key", key);
  answer.textContent = "";
  status.textContent = "asking...";
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const body = { model, stream: true, max_tokens: Number(document.getElementById("chat-max").value) || 128,
                 messages: [{ role: "user", content: question }] };
  const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    status.textContent = `error ${response.status}: ${error.error ? error.error.message : response.statusText}`;
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { status.textContent = `error: ${chunk.error.message}`; return; }
      const choice = chunk.choices[0];
      if (choice && choice.delta.content) answer.textContent += choice.delta.content;
      if (choice && choice.finish_reason) finish = choice.finish_reason;
    }
  }
  status.textContent = `done (${finish || "?"})`;
  answer.dataset.done = "true";
}

document.getElementById("chat-key").value = sessionStorage.getItem("lime-key") || "";
document.getElementById("chat-form").addEventListener("submit", ask);
fetch("/api/cluster").then((r) => r.json()).then(render);
follow();
