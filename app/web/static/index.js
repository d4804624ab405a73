// The studies page: the signed-in owner's studies with status, progress, best value and age.
import { ApiError, el, formatAge, formatValue, getJSON, keyRejected, mountSignIn, takeKeyFromFragment } from "./api.js";

const PAGE = 50;
const REFRESH_MS = 5000;
const body = document.querySelector("#studies-table tbody");
const notice = document.getElementById("notice");
const more = document.getElementById("more");
const filter = document.getElementById("status-filter");
let cursor = null;

function showNotice(text, error = false) {
  notice.textContent = text;
  notice.classList.toggle("error", error);
  notice.classList.toggle("hidden", !text);
}

function objectiveText(spec) {
  const objectives = Array.isArray(spec.objective) ? spec.objective : [spec.objective];
  return objectives.map((o) => `${o.direction === "minimize" ? "min" : "max"} ${o.metric}`).join(", ");
}

function progressCell(progress) {
  const total = Math.max(1, progress.n_trials);
  const bar = el("div", { class: "progress", title: `${progress.finished} of ${progress.n_trials} finished` },
    el("span", { class: "done" }), el("span", { class: "run" }));
  const [done, run] = bar.children;
  done.style.width = `${(100 * progress.finished) / total}%`;
  run.style.left = done.style.width;
  run.style.width = `${(100 * progress.running) / total}%`;
  return el("td", {}, bar, el("span", { class: "counts" },
    ` ${progress.finished}/${progress.n_trials}` + (progress.running ? ` · ${progress.running} running` : "")));
}

function row(study) {
  const best = study.best_trial;
  const created = new Date(study.created_at).toLocaleString();
  const short = study.id.slice(0, 8);
  return el("tr", { "data-id": study.id, title: `${study.name} · id ${study.id} · created ${created}`,
                    onclick: () => { location.href = `/studies/${study.id}`; } },
    el("td", {}, el("a", { href: `/studies/${study.id}` }, study.name), " ", el("span", { class: "short-id" }, short)),
    el("td", {}, el("span", { class: `badge ${study.status}` }, study.status)),
    progressCell(study.progress),
    el("td", { class: "num" }, best ? `${formatValue(best.value)} (#${best.number})` : "—"),
    el("td", {}, objectiveText(study.spec)),
    el("td", {}, `${study.dataset} · ${study.model}`),
    el("td", { class: "age", title: `created ${created}` }, formatAge(study.created_at)));
}

async function load(reset) {
  if (reset) cursor = null;
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (cursor) params.set("cursor", cursor);
  if (filter.value) params.set("status", filter.value);
  try {
    const page = await getJSON(`/studies?${params}`);
    if (reset) body.replaceChildren();
    body.append(...page.data.map(row));
    if (!body.children.length) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No studies yet: POST /api/v1/studies or `hpsearch submit`.")));
    }
    cursor = page.next_cursor;
    more.classList.toggle("hidden", !cursor);
    document.getElementById("studies-count").textContent = `${page.count} studies`;
    showNotice("");
    document.body.dataset.ready = "true";
  } catch (error) {
    body.replaceChildren();
    if (error instanceof ApiError && error.status === 401) {
      showNotice(keyRejected() ? "That API key was rejected (revoked or mistyped): sign in with a valid key."
        : "Sign in with your API key to see your studies.", keyRejected());
    }
    else showNotice(`Could not load studies: ${error.message}`, true);
  }
}

takeKeyFromFragment();
mountSignIn(document.getElementById("signin"), () => load(true));
filter.addEventListener("change", () => load(true));
document.getElementById("refresh").addEventListener("click", () => load(true));
more.addEventListener("click", () => load(false));
load(true);
setInterval(() => { if (!cursor && document.visibilityState === "visible") load(true); }, REFRESH_MS);
