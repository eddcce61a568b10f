// The job dashboard: draws the snapshot embedded in the page, then polls the JSON endpoint and
// redraws in place. Every text from the server goes in through textContent, never as HTML.
(function () {
  "use strict";

  const root = document.getElementById("jobs-dashboard");
  if (!root) return;
  const urls = {
    data: root.dataset.dataUrl,
    retry: root.dataset.retryUrl,
    pause: root.dataset.pauseUrl,
    resume: root.dataset.resumeUrl,
    "batch-cancel": root.dataset.batchCancelUrl,
    "batch-retry": root.dataset.batchRetryUrl,
  };
  const pollMs = Number(root.dataset.pollMs) || 2500;
  const csrfToken = root.dataset.csrfToken;
  const STATUSES = ["todo", "doing", "succeeded", "failed", "cancelled", "aborted"];
  const SVG = "http://www.w3.org/2000/svg";

  // --- small DOM helpers ---------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "className") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fillBody(tableId, rows, columns, emptyText) {
    const body = document.querySelector("#" + tableId + " tbody");
    body.replaceChildren();
    if (!rows.length) {
      body.append(el("tr", {}, el("td", { className: "dash-empty", colSpan: columns }, emptyText)));
      return;
    }
    for (const row of rows) body.append(row);
  }

  function num(value) {
    return el("td", { className: "num" }, value === null || value === undefined ? "–" : value);
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
    return (ms / 60000).toFixed(1) + " min";
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return date.toLocaleString();
  }

  function ago(iso) {
    if (!iso) return "–";
    const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    return seconds < 90 ? seconds + " s ago" : Math.round(seconds / 60) + " min ago";
  }

  function button(label, action, data) {
    const attrs = { type: "button", className: "button", "data-action": action };
    for (const [key, value] of Object.entries(data)) attrs["data-" + key] = value;
    return el("button", attrs, label);
  }

  // --- sections ------------------------------------------------------------------------------

  function drawQueues(data) {
    const rows = data.queues.map((queue) =>
      el(
        "tr",
        { "data-queue": queue.name, "data-paused": queue.paused ? "true" : "false" },
        el("th", {}, queue.name),
        ...STATUSES.map((status) => {
          const cell = num(queue.counts[status] || 0);
          cell.setAttribute("data-status", status);
          return cell;
        }),
        el(
          "td",
          { className: "queue-state" },
          queue.paused ? el("span", { className: "dash-paused-badge" }, "paused") : "running",
        ),
        el(
          "td",
          {},
          data.permissions.pause
            ? queue.paused
              ? button("Resume", "resume", { queue: queue.name })
              : button("Pause", "pause", { queue: queue.name })
            : null,
        ),
      ),
    );
    fillBody("dash-queues", rows, 9, "No queues.");
  }

  function drawChart(containerId, totalId, buckets, labelEvery, label) {
    const width = 600;
    const height = 160;
    const left = 30;
    const bottom = 18;
    const plotWidth = width - left - 4;
    const plotHeight = height - bottom - 8;
    const peak = Math.max(1, ...buckets.map((b) => b.succeeded + b.failed));
    const step = plotWidth / Math.max(1, buckets.length);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", preserveAspectRatio: "none" });
    chart.append(svg("line", { class: "axis", x1: left, y1: 8, x2: left, y2: 8 + plotHeight }));
    chart.append(svg("line", { class: "axis", x1: left, y1: 8 + plotHeight, x2: width, y2: 8 + plotHeight }));
    chart.append(svg("text", { x: left - 4, y: 14, "text-anchor": "end" }, String(peak)));
    chart.append(svg("text", { x: left - 4, y: 8 + plotHeight, "text-anchor": "end" }, "0"));
    let succeeded = 0;
    let failed = 0;
    buckets.forEach((bucket, index) => {
      succeeded += bucket.succeeded;
      failed += bucket.failed;
      const x = left + index * step + 1;
      const barWidth = Math.max(1, step - 2);
      const okHeight = (bucket.succeeded / peak) * plotHeight;
      const badHeight = (bucket.failed / peak) * plotHeight;
      const start = new Date(bucket.start);
      const tip = `${label(start)}: ${bucket.succeeded} succeeded, ${bucket.failed} failed`;
      const group = svg("g", {});
      group.append(svg("title", {}, tip));
      group.append(svg("rect", { class: "ok", x, width: barWidth, y: 8 + plotHeight - okHeight, height: okHeight }));
      group.append(
        svg("rect", { class: "bad", x, width: barWidth, y: 8 + plotHeight - okHeight - badHeight, height: badHeight }),
      );
      chart.append(group);
      if (index % labelEvery === 0) {
        chart.append(svg("text", { x, y: height - 4 }, label(start)));
      }
    });
    document.getElementById(containerId).replaceChildren(chart);
    document.getElementById(totalId).textContent = `${succeeded} succeeded, ${failed} failed`;
  }

  const hhmm = (date) => date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

  function drawFailing(data) {
    const rows = data.failing.map((task) =>
      el(
        "tr",
        { "data-task": task.task },
        el("th", {}, task.task),
        num(task.failed),
        num(task.recent_failures),
        el("td", {}, when(task.last_failed_at)),
        el("td", { className: "dash-error-text" }, task.last_error || "–"),
        el(
          "td",
          {},
          data.permissions.retry && task.failed > 0 ? button("Retry failed", "retry", { task: task.task }) : null,
        ),
      ),
    );
    fillBody("dash-failing", rows, 6, "No failures.");
  }

  function drawLatency(data) {
    const rows = data.latency.map((task) =>
      el(
        "tr",
        { "data-task": task.task },
        el("th", {}, task.task),
        num(task.started),
        num(task.finished),
        num(duration(task.wait_ms.p50)),
        num(duration(task.wait_ms.p95)),
        num(duration(task.wait_ms.p99)),
        num(duration(task.run_ms.p50)),
        num(duration(task.run_ms.p95)),
        num(duration(task.run_ms.p99)),
      ),
    );
    fillBody("dash-latency", rows, 9, "No job started in this window.");
  }

  function drawWorkers(data) {
    document.getElementById("dash-workers-count").textContent = String(data.workers.length);
    const rows = data.workers.map((worker) =>
      el("tr", { "data-worker": worker.id }, el("td", {}, "#" + worker.id), el("td", {}, worker.host || ""), el("td", {}, ago(worker.last_heartbeat)), num(worker.running)),
    );
    fillBody("dash-workers", rows, 4, "No live worker.");
  }

  function drawPaused(data) {
    const list = document.getElementById("dash-paused");
    list.replaceChildren();
    if (!data.paused.length) {
      list.append(el("li", { className: "dash-empty" }, "None."));
      return;
    }
    for (const queue of data.paused) {
      list.append(el("li", { "data-queue": queue.name }, `${queue.name} (since ${when(queue.paused_at)})`));
    }
  }

  function drawBreakers(data) {
    const rows = data.breakers.map((breaker) =>
      el(
        "tr",
        { "data-breaker": breaker.name },
        el("td", {}, breaker.name),
        el("td", {}, breaker.state),
        num(breaker.consecutive_failures),
        el("td", {}, when(breaker.opened_until)),
      ),
    );
    fillBody("dash-breakers", rows, 4, "All closed (none has failed yet).");
  }

  function drawRunning(data) {
    const rows = data.running.map((job) => {
      const percent = job.percent === null ? null : Math.min(100, job.percent);
      const bar = el("span", { className: "dash-bar" }, el("span", {}));
      bar.firstChild.style.width = (percent || 0) + "%";
      const text = `${job.processed ?? "?"} / ${job.total ?? "?"}` + (percent === null ? "" : ` (${percent}%)`);
      return el(
        "tr",
        { "data-job": job.job_id },
        el("td", {}, "#" + job.job_id),
        el("td", {}, job.task),
        el("td", {}, job.queue),
        el("td", {}, bar, " ", text),
        el("td", {}, ago(job.progress_at)),
      );
    });
    fillBody("dash-running", rows, 5, "No running job reports progress.");
  }

  function drawBatches(data) {
    const rows = data.batches.map((batch) => {
      const bar = el("span", { className: "dash-bar" }, el("span", {}));
      bar.firstChild.style.width = (batch.percent || 0) + "%";
      const text = `${batch.done} / ${batch.total}` + (batch.percent === null ? "" : ` (${batch.percent}%)`);
      return el(
        "tr",
        { "data-batch": batch.id },
        el("td", {}, "#" + batch.id),
        el("td", {}, batch.name || "–"),
        el("td", {}, batch.state),
        el("td", {}, bar, " ", text),
        num(batch.succeeded),
        num(batch.failed),
        num(batch.cancelled),
        el(
          "td",
          {},
          data.permissions.cancel && batch.state !== "done" ? button("Cancel", "batch-cancel", { batch: batch.id }) : null,
          data.permissions.retry && batch.failed > 0 ? button("Retry failed", "batch-retry", { batch: batch.id }) : null,
        ),
      );
    });
    fillBody("dash-batches", rows, 8, "No batch.");
  }

  function drawBlocked(data) {
    const rows = data.blocked.map((job) =>
      el(
        "tr",
        { "data-job": job.job_id },
        el("td", {}, "#" + job.job_id),
        el("td", {}, job.task),
        el("td", {}, job.queue),
        el("td", {}, job.waiting_for.map((id) => "#" + id).join(", ") || `${job.parents_waiting} parent(s)`),
      ),
    );
    fillBody("dash-blocked", rows, 4, "No job waits for its parents.");
  }

  function drawLimits(data) {
    const rows = data.limits.map((slot) =>
      el(
        "tr",
        { "data-key": slot.key },
        el("td", {}, slot.key),
        el("td", {}, `${slot.running} / ${slot.limit}`),
        num(slot.waiting),
      ),
    );
    fillBody("dash-limits", rows, 3, "No job with a concurrency limit is running or waiting.");
  }

  function draw(data) {
    drawQueues(data);
    drawChart("dash-chart-hour", "dash-total-hour", data.throughput.hour, 10, hhmm);
    drawChart("dash-chart-day", "dash-total-day", data.throughput.day, 4, hhmm);
    drawFailing(data);
    drawLatency(data);
    drawWorkers(data);
    drawPaused(data);
    drawBreakers(data);
    drawRunning(data);
    drawBatches(data);
    drawLimits(data);
    drawBlocked(data);
    const updated = document.getElementById("dash-updated");
    updated.dateTime = data.generated_at;
    updated.textContent = new Date(data.generated_at).toLocaleTimeString();
  }

  // --- polling and actions -------------------------------------------------------------------

  function say(text, kind) {
    const message = document.getElementById("dash-message");
    message.textContent = text;
    message.className = kind ? "dash-" + kind : "";
  }

  let inFlight = false;

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const response = await fetch(urls.data, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.includes("application/json")) {
        // The admin answers a login page once the session is gone.
        say(response.redirected ? "Your session has ended: reload the page to log in." : `Refresh failed (${response.status}).`, "error");
        return;
      }
      draw(await response.json());
      if (document.getElementById("dash-message").className === "dash-error") say("", null);
    } catch (error) {
      say("Refresh failed: " + error.message, "error");
    } finally {
      inFlight = false;
    }
  }

  // A failed job whose queueing lock has a job waiting is skipped: say how many, and why.
  function retryMessage(answer) {
    let text = `Retried ${answer.retried} failed job(s) of ${answer.task}.`;
    if (answer.skipped) {
      const first = answer.skipped_jobs && answer.skipped_jobs[0];
      text += ` Skipped ${answer.skipped}` + (first ? ` (job ${first.job_id}: ${first.reason})` : "") + ".";
    }
    return text;
  }

  async function act(buttonNode) {
    const action = buttonNode.dataset.action;
    const body =
      action === "retry"
        ? { task: buttonNode.dataset.task }
        : action.startsWith("batch-")
          ? { batch: buttonNode.dataset.batch }
          : { queue: buttonNode.dataset.queue };
    buttonNode.disabled = true;
    try {
      const response = await fetch(urls[action], {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrfToken },
        body: JSON.stringify(body),
      });
      const answer = await response.json().catch(() => ({}));
      if (response.status === 409) {
        // Refused for a reason the operator must read (a queueing lock taken): the next
        // refresh does not clear it, as it does a failed refresh's message.
        say(answer.detail, "refused");
        return;
      }
      if (!response.ok) {
        say(answer.detail || `The action failed (${response.status}).`, "error");
        return;
      }
      if (action === "retry") say(retryMessage(answer), answer.skipped ? "refused" : "done");
      else if (action === "batch-cancel") say(`Batch ${answer.batch}: ${answer.cancelled} waiting job(s) cancelled.`, "done");
      else if (action === "batch-retry")
        say(`Batch ${answer.batch}: ${answer.retried.length} failed job(s) retried, ${answer.refused.length} refused.`, "done");
      else say(`Queue ${answer.queue} ${answer.paused ? "paused" : "resumed"}.`, "done");
      await refresh();
    } catch (error) {
      say("The action failed: " + error.message, "error");
    } finally {
      buttonNode.disabled = false;
    }
  }

  root.addEventListener("click", (event) => {
    const target = event.target.closest("button[data-action]");
    if (target && root.contains(target)) act(target);
  });

  draw(JSON.parse(document.getElementById("dashboard-snapshot").textContent));
  setInterval(refresh, pollMs);
})();
