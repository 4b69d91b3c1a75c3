// The skyproxy dashboard: polls /-/api/* and draws what it gets. No inline script or
// style (the page's CSP forbids both); text goes in with textContent, never as HTML.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="skyproxy-csrf"]').content;
  const COLORS = { rps: "#2563eb", ok: "#1a7f37", c4: "#b26a00", c5: "#c62828", r429: "#7c3aed" };

  // -- small helpers ---------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }

  function cell(content, cls) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content == null ? "-" : String(content);
    if (cls) td.className = cls;
    return td;
  }

  function fill(tbody, rows) {
    const fresh = document.createDocumentFragment();
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const c of row) tr.appendChild(c instanceof HTMLElement && c.tagName === "TD" ? c : cell(c));
      fresh.appendChild(tr);
    }
    tbody.replaceChildren(fresh);
  }

  function stat(label, value, cls) {
    const box = document.createElement("div");
    box.className = "stat";
    const v = document.createElement("span");
    v.className = "value" + (cls ? " " + cls : "");
    v.textContent = value;
    const l = document.createElement("span");
    l.className = "label";
    l.textContent = label;
    box.append(v, l);
    return box;
  }

  function usd(v) { return v == null ? "-" : "$" + Number(v).toFixed(v >= 100 ? 0 : 4).replace(/\.?0+$/, "") ; }
  function ms(v) { return v == null ? "-" : Math.round(v) + " ms"; }
  function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, "") : "-"; }

  async function get(name) {
    const answer = await fetch("/-/api/" + name, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!answer.ok) throw new Error(name + ": HTTP " + answer.status);
    return answer.json();
  }

  function setState(ok, text) {
    const pill = $("state");
    pill.textContent = text;
    pill.className = "pill " + (ok ? "good" : "bad");
    if (ok) $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  // Runs `work` now and every `ms`, never two at once; a failure shows in the header.
  function every(period, work) {
    let busy = false;
    async function tick() {
      if (busy) return;
      busy = true;
      try {
        await work();
        setState(true, "live");
      } catch (error) {
        setState(false, "offline");
      } finally {
        busy = false;
      }
    }
    tick();
    window.setInterval(tick, period);
  }

  // -- charts ------------------------------------------------------------------------------
  const charts = [];

  function chart(id, series) {
    const box = $(id);
    const options = {
      width: Math.max(box.clientWidth, 300),
      height: 200,
      scales: { x: { time: true } },
      series: [{}].concat(series.map(([label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: false }))),
      axes: [{}, { size: 56 }],
      legend: { live: false },
    };
    const empty = [[]].concat(series.map(() => []));
    const plot = new uPlot(options, empty, box);
    charts.push([plot, box]);
    return plot;
  }

  const rateSeries = [["req/s", COLORS.rps], ["2xx/s", COLORS.ok], ["4xx/s", COLORS.c4], ["5xx/s", COLORS.c5], ["429/s", COLORS.r429]];
  const latencySeries = [["p50 ms", COLORS.rps], ["p95 ms", COLORS.c5]];
  const rate15 = chart("chart-rate-15m", rateSeries);
  const latency15 = chart("chart-latency-15m", latencySeries);
  const rate24 = chart("chart-rate-24h", rateSeries);
  const latency24 = chart("chart-latency-24h", latencySeries);

  window.addEventListener("resize", () => {
    for (const [plot, box] of charts) plot.setSize({ width: Math.max(box.clientWidth, 300), height: 200 });
  });

  function perSecond(values, step) { return values.map((n) => n / step); }

  function drawTraffic(doc, rate, latency) {
    const step = doc.step;
    const limited = doc.t.map((_, i) => Object.values(doc.rejected).reduce((sum, column) => sum + column[i], 0));
    rate.setData([doc.t, doc.rps, perSecond(doc["2xx"], step), perSecond(doc["4xx"], step), perSecond(doc["5xx"], step), perSecond(limited, step)]);
    latency.setData([doc.t, doc.p50, doc.p95]);
  }

  // -- sections ----------------------------------------------------------------------------
  let sinceStart = {};

  async function summary() {
    const doc = await get("summary");
    const m = doc.last_minute;
    $("version").textContent = "v" + doc.version + " · generation " + doc.generation + " · " + doc.environments.join(", ");
    $("headline").replaceChildren(
      stat("requests, last minute", String(m.requests)),
      stat("2xx", String(m["2xx"]), "good"),
      stat("4xx", String(m["4xx"]), m["4xx"] ? "warn" : ""),
      stat("5xx", String(m["5xx"]), m["5xx"] ? "bad" : ""),
      stat("p50", ms(m.p50_ms)),
      stat("p95", ms(m.p95_ms)),
    );
    sinceStart = doc.rejected_since_start;
  }

  async function traffic15() {
    const doc = await get("traffic?window=15m");
    drawTraffic(doc, rate15, latency15);
    const rules = new Set(Object.keys(doc.rejected_total).concat(Object.keys(sinceStart)));
    const rows = Array.from(rules).sort().map((rule) => [
      cell(rule, "rule"), cell(String(doc.rejected_total[rule] || 0), "num"), cell(String(sinceStart[rule] || 0), "num"),
    ]);
    fill(document.querySelector("#rejections tbody"), rows.length ? rows : [[cell("no 429s"), cell(""), cell("")]]);
  }

  async function traffic24() {
    drawTraffic(await get("traffic?window=24h"), rate24, latency24);
  }

  function spendTable(title, rows) {
    const wrap = document.createElement("div");
    const h = document.createElement("h3");
    h.textContent = title;
    const table = document.createElement("table");
    const body = document.createElement("tbody");
    table.appendChild(body);
    fill(body, rows.length ? rows : [[cell("nothing yet")]]);
    wrap.append(h, table);
    return wrap;
  }

  async function spend() {
    const doc = await get("spend");
    $("spend-totals").replaceChildren(stat("today (UTC)", usd(doc.today.usd)), stat("this month", usd(doc.month.usd)));
    const tables = [];
    for (const [dimension, label] of [["user", "By user"], ["model", "By model"], ["client", "By client token"], ["environment", "By environment"]]) {
      const month = new Map(doc.month.by[dimension].map((r) => [r.key, r.usd]));
      const today = new Map(doc.today.by[dimension].map((r) => [r.key, r.usd]));
      const keys = Array.from(new Set([...month.keys(), ...today.keys()]));
      tables.push(spendTable(label + " (today / month)", keys.map((k) => [
        cell(k == null ? "(none)" : k), cell(usd(today.get(k) || 0), "num"), cell(usd(month.get(k) || 0), "num"),
      ])));
    }
    $("spend-tables").replaceChildren(...tables);
    fill(document.querySelector("#budgets tbody"), doc.budgets.map((b) => {
      const bar = document.createElement("span");
      const used = b.used_fraction == null ? 0 : b.used_fraction;
      bar.className = "bar" + (used >= 1 ? " bad" : used >= 0.8 ? " warn" : "");
      const inner = document.createElement("span");
      inner.style.width = Math.min(100, used * 100).toFixed(1) + "%";
      bar.appendChild(inner);
      const label = document.createElement("span");
      label.textContent = " " + Math.round(used * 100) + "%";
      const both = document.createElement("span");
      both.append(bar, label);
      return [b.budget, b.per, b.subject == null ? "(all)" : b.subject, b.period, cell(usd(b.spent_usd), "num"), cell(usd(b.limit_usd), "num"), cell(both), when(b.resets_at)];
    }));
  }

  async function predictions() {
    const doc = await get("predictions");
    fill(document.querySelector("#prediction-list tbody"), doc.predictions.map((p) => [
      when(p.timestamp), p.environment, p.userId, p.client, p.model,
      cell(p.status, p.status === "failed" ? "bad" : p.status === "rejected" ? "warn" : p.status === "succeeded" ? "good" : ""),
      cell(p.httpStatus == null ? "-" : String(p.httpStatus), "num"), cell(ms(p.latencyMs), "num"), cell(usd(p.costUsd), "num"),
      cell(p.predictionId, "prediction-id"),
    ]));
  }

  async function keys() {
    const doc = await get("keys");
    fill(document.querySelector("#key-list tbody"), doc.keys.map((k) => [
      k.environment, k.fingerprint, k.source,
      cell(k.age_days == null ? "unknown" : k.age_days + " days" + (k.too_old ? " (over " + k.max_age_days + ": rotate)" : ""), k.too_old ? "bad" : ""),
      cell(k.last_401 ? when(k.last_401) + " (" + k.upstream_401 + " total)" : "never", k.last_401 ? "bad" : ""),
    ]));
  }

  async function tokens() {
    const doc = await get("tokens");
    const problem = $("token-problem");
    problem.hidden = !doc.problem;
    problem.textContent = doc.problem || "";
    const rows = doc.tokens.map((t) => [
      t.name, t.environments.join(", "), t.user == null ? "(" + t.binding + ")" : t.user, when(t.last_used), t.expires ? when(t.expires) : "never",
    ]);
    fill(document.querySelector("#token-list tbody"), rows.length ? rows : [[cell("no client tokens")]]);
  }

  async function replay(id) {
    const answer = await fetch("/-/api/webhooks/replay", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Skyproxy-Csrf": csrf },
      body: JSON.stringify({ id }),
    });
    const doc = await answer.json();
    $("replay-result").textContent = answer.ok ? "queued " + id + " again (was " + doc.was + ")" : doc.error.message;
    await webhooks();
  }

  async function webhooks() {
    const doc = await get("webhooks");
    if (!doc.enabled) {
      $("webhook-stats").replaceChildren(stat("webhooks", "off"));
      fill(document.querySelector("#dead-list tbody"), []);
      return;
    }
    $("webhook-stats").replaceChildren(
      stat("outbox depth", String(doc.outbox_depth), doc.outbox_depth ? "warn" : ""),
      stat("oldest pending", doc.oldest_pending_s == null ? "-" : Math.round(doc.oldest_pending_s) + " s"),
      stat("delivered", String(doc.delivered)),
      stat("dead since start", String(doc.dead_total), doc.dead_total ? "bad" : ""),
      stat("dead in the store", String(doc.dead.length), doc.dead.length ? "bad" : ""),
    );
    fill(document.querySelector("#dead-list tbody"), doc.dead.map((d) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Replay";
      button.dataset.id = d.id;
      button.addEventListener("click", () => { button.disabled = true; replay(d.id).catch(() => setState(false, "replay failed")); });
      return [cell(button), cell(d.id, "event-id"), d.prediction_id, d.target, cell(String(d.attempts), "num"), d.last_error];
    }));
  }

  async function health() {
    const doc = await get("health");
    const items = [
      ["config generation", doc.config.generation],
      ["loaded at", when(doc.config.loaded_at)],
      ["last reload error", doc.config.last_reload_error || "none"],
      ["audit writer", doc.audit.healthy ? "healthy" : "failing"],
      ["audit queue", doc.audit.queue_depth],
      ["audit lines written", doc.audit.written],
      ["audit lines dropped", doc.audit.dropped],
      ["client tokens", doc.tokens.count + (doc.tokens.problem ? " (" + doc.tokens.problem + ")" : "")],
      ["uptime", Math.round(doc.uptime_s) + " s"],
    ];
    if (doc.cluster) items.push(["cluster", doc.cluster.degraded ? "degraded" : "ok"]);
    const list = document.createDocumentFragment();
    for (const [label, value] of items) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      if ((label === "audit writer" && !doc.audit.healthy) || (label === "last reload error" && doc.config.last_reload_error)) dd.className = "bad";
      list.append(dt, dd);
    }
    $("health-list").replaceChildren(list);
  }

  every(1000, async () => { await summary(); await traffic15(); await predictions(); });
  every(2000, spend);
  every(15000, traffic24);
  every(5000, async () => { await keys(); await tokens(); await webhooks(); await health(); });
})();
