// Overseer: keeps the server-rendered pages live. No framework, no build step.
// - [data-refresh] regions are fetched again as HTML once the previous answer came (never piling up);
// - the events table follows the SSE feed; EventSource resends the last id on reconnect;
// - buttons with data-post run an action with the token kept in this tab (sessionStorage).
(() => {
  'use strict';
  const TOKEN_KEY = 'overseer-token';
  const notice = document.getElementById('notice');
  const stats = (window.overseer = { received: 0, duplicates: 0, refreshed: 0 });

  function say(text, bad) {
    notice.textContent = text;
    notice.className = bad ? 'bad' : 'ok';
    notice.hidden = false;
  }

  // ---- token ------------------------------------------------------------------------------
  const tokenForm = document.getElementById('token-form');
  if (tokenForm) {
    const input = document.getElementById('token');
    const state = document.getElementById('token-state');
    const show = () => { state.textContent = sessionStorage.getItem(TOKEN_KEY) ? 'token set' : 'no token'; };
    tokenForm.addEventListener('submit', (event) => {
      event.preventDefault();
      if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
      else sessionStorage.removeItem(TOKEN_KEY);
      input.value = '';
      show();
    });
    show();
  }

  // ---- live regions -----------------------------------------------------------------------
  const timers = new Map();
  function schedule(el, delay) {
    clearTimeout(timers.get(el));
    timers.set(el, setTimeout(() => refresh(el), delay ?? (Number(el.dataset.every) || 2000)));
  }
  async function refresh(el) {
    if (document.hidden) return schedule(el);
    try {
      const answer = await fetch(el.dataset.refresh, { headers: { Accept: 'text/html' } });
      if (answer.ok) {
        el.innerHTML = await answer.text();
        el.classList.remove('stale');
        stats.refreshed++;
      } else {
        el.classList.add('stale');
      }
    } catch (err) {
      el.classList.add('stale');
    }
    if (!el.querySelector('[data-final]')) schedule(el);
  }
  const regions = [...document.querySelectorAll('[data-refresh]')];
  regions.forEach((el) => schedule(el));
  const refreshNow = () => regions.forEach((el) => schedule(el, 0));

  // ---- actions ----------------------------------------------------------------------------
  document.addEventListener('click', async (event) => {
    const button = event.target.closest('button[data-post]');
    if (!button) return;
    event.preventDefault();
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = 'Bearer ' + token;
    button.disabled = true;
    try {
      const answer = await fetch(button.dataset.post, { method: 'POST', headers });
      const body = await answer.json().catch(() => ({}));
      if (answer.ok) {
        say('done: ' + Object.entries(body).map(([k, v]) => `${k} ${v}`).join(', '));
        refreshNow();
      } else {
        say(`refused (${answer.status}): ${body.detail || answer.statusText}`, true);
      }
    } catch (err) {
      say('the dashboard did not answer: ' + err, true);
    } finally {
      button.disabled = false;
    }
  });

  // ---- live events ------------------------------------------------------------------------
  const table = document.getElementById('events');
  if (table) {
    const base = document.body.dataset.base || '';
    const tbody = table.tBodies[0];
    const seen = new Set([...tbody.rows].map((row) => row.dataset.id));
    const state = document.getElementById('feed-state');
    const cell = (text, cls) => {
      const td = document.createElement('td');
      td.textContent = text ?? '';
      if (cls) td.className = cls;
      return td;
    };
    const time = (ms) => (ms ? new Date(Number(ms)).toISOString().replace('T', ' ').slice(0, 23) : '-');
    const runTime = (ms) => (ms === '' || ms == null ? '' : Number(ms) >= 1000 ? (ms / 1000).toFixed(2) + ' s' : Math.round(ms) + ' ms');
    const row = (e) => {
      const tr = document.createElement('tr');
      tr.dataset.id = e.id;
      tr.dataset.job = e.job_id;
      tr.dataset.type = e.type;
      tr.className = 'new';
      tr.append(cell(time(e.ts)));
      const kind = cell('');
      const tag = document.createElement('span');
      tag.className = 'ev ' + e.type.replace('.', '-');
      tag.textContent = e.type;
      kind.append(tag);
      tr.append(kind, cell(e.queue), cell(e.backend));
      const job = cell('');
      if (e.job_id) {
        const a = document.createElement('a');
        a.href = `${base}/jobs/${encodeURIComponent(e.job_id)}`;
        a.textContent = e.job_id;
        job.append(a);
      }
      tr.append(job, cell(e.task), cell(e.attempt, 'n'), cell(e.worker_id), cell(runTime(e.duration_ms), 'n'), cell(e.error, 'bad'));
      return tr;
    };
    const source = new EventSource(`${table.dataset.stream}&after=${encodeURIComponent(table.dataset.after)}`);
    source.onopen = () => { state.textContent = 'live'; state.className = 'state healthy'; };
    source.onerror = () => { state.textContent = 'reconnecting'; state.className = 'state warning'; };
    source.onmessage = (message) => {
      const e = JSON.parse(message.data);
      if (seen.has(e.id)) { stats.duplicates++; return; }
      seen.add(e.id);
      stats.received++;
      tbody.prepend(row(e));
      while (tbody.rows.length > 500) seen.delete(tbody.lastElementChild.dataset.id), tbody.lastElementChild.remove();
    };
  }
})();
