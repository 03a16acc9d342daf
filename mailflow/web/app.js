// mailflow webmail: sign in with a mailbox token, read inbox and Sent, compose and send.
// No framework, no build step. Untrusted text only ever goes through textContent; HTML
// mail is sanitised by the API (html_safe) and shown in a sandboxed srcdoc iframe
// without allow-scripts, under this page's CSP (nothing remote loads).
'use strict';

const FINAL = new Set(['stored', 'delivered', 'bounced', 'rejected', 'quarantined', 'rate_limited']);
const BAD = new Set(['bounced', 'rejected', 'quarantined', 'rate_limited', 'deferred']);
const PAGE = 20;
const $ = (id) => document.getElementById(id);
const state = { token: null, address: null, folder: 'inbox', cursors: [null], page: 0 };

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function showAlert(msg) {
  const a = $('alert');
  a.textContent = msg || '';
  a.hidden = !msg;
}

function errorText(status, doc) {
  const err = doc && doc.error;
  if (!err) return 'HTTP ' + status;
  let text = err.message || err.code || ('HTTP ' + status);
  if (err.fields) text += '\n' + Object.entries(err.fields).map(([f, m]) => f + ': ' + m).join('\n');
  return text;
}

async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers['Authorization'] = 'Bearer ' + state.token;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  let doc = null;
  const ct = r.headers.get('Content-Type') || '';
  if (ct.startsWith('application/json')) doc = await r.json();
  if (r.status === 401 && state.token) {
    signOut('Your session is no longer valid: ' + errorText(r.status, doc));
  }
  return { status: r.status, doc, resp: r };
}

function mailboxPath(suffix) {
  return '/v1/mailboxes/' + encodeURIComponent(state.address) + '/messages' + (suffix || '');
}

// ---- views ---------------------------------------------------------------------------
function show(view) {
  for (const v of ['signin', 'list', 'message', 'compose']) $('view-' + v).hidden = v !== view;
  for (const b of document.querySelectorAll('#nav [data-view]')) {
    const current = (view === 'list' && b.dataset.view === state.folder) || b.dataset.view === view;
    if (current) b.setAttribute('aria-current', 'page'); else b.removeAttribute('aria-current');
  }
}

function focusHeading(id) {
  const h = $(id);
  h.setAttribute('tabindex', '-1');
  h.focus();
}

// ---- sign in / out -------------------------------------------------------------------
async function signIn(token) {
  state.token = token;
  const { status, doc } = await api('/v1/whoami');
  if (status !== 200 || doc.kind !== 'token') {
    state.token = null;
    showAlert(status === 200 ? 'That is an API key: sign in with a mailbox token.' : 'Sign-in failed: ' + errorText(status, doc));
    return false;
  }
  sessionStorage.setItem('mailflow.token', token);
  state.address = doc.address;
  $('me').textContent = 'Signed in as ' + doc.address;
  $('c-from').value = doc.address;
  $('nav').hidden = false;
  showAlert('');
  await openFolder('inbox');
  return true;
}

function signOut(msg) {
  sessionStorage.removeItem('mailflow.token');
  state.token = null;
  state.address = null;
  $('nav').hidden = true;
  $('token').value = '';
  show('signin');
  showAlert(msg || '');
}

// ---- folders -------------------------------------------------------------------------
async function openFolder(folder) {
  state.folder = folder;
  state.cursors = [null];
  state.page = 0;
  await loadPage();
  focusHeading('list-h');
}

async function loadPage() {
  show('list');
  $('list-h').textContent = state.folder === 'sent' ? 'Sent' : 'Inbox';
  const cursor = state.cursors[state.page];
  const q = new URLSearchParams({ folder: state.folder, limit: String(PAGE) });
  if (cursor !== null) q.set('cursor', cursor);
  const { status, doc } = await api(mailboxPath('?' + q));
  const body = $('list').tBodies[0];
  body.replaceChildren();
  if (status !== 200) {
    showAlert('Could not load the folder: ' + errorText(status, doc));
    return;
  }
  $('list-count').textContent = doc.total + (doc.total === 1 ? ' message' : ' messages');
  for (const m of doc.messages) {
    const tr = el('tr', null, { 'data-id': m.id });
    const who = state.folder === 'sent' ? (m.to || (m.recipients || []).join(', ')) : (m.from || m.sender);
    tr.append(el('td', who || ''));
    const td = el('td');
    const a = el('a', m.subject || '(no subject)', { href: '#' + m.id });
    a.addEventListener('click', (ev) => { ev.preventDefault(); openMessage(m.id); });
    td.append(a);
    tr.append(td, el('td', m.date || ''));
    body.append(tr);
  }
  if (state.cursors.length <= state.page + 1) state.cursors.push(doc.next_cursor === null ? undefined : String(doc.next_cursor));
  else state.cursors[state.page + 1] = doc.next_cursor === null ? undefined : String(doc.next_cursor);
  $('older').disabled = doc.next_cursor === null || doc.next_cursor === undefined;
  $('newer').disabled = state.page === 0;
}

// ---- one message ---------------------------------------------------------------------
async function openMessage(id) {
  const { status, doc } = await api(mailboxPath('/' + encodeURIComponent(id)));
  if (status !== 200) {
    showAlert('Could not open the message: ' + errorText(status, doc));
    return;
  }
  show('message');
  $('msg-subject').textContent = doc.subject || '(no subject)';
  const dl = $('msg-headers');
  dl.replaceChildren();
  for (const [k, v] of [['From', doc.from || doc.sender], ['To', doc.to], ['Date', doc.date]]) {
    if (!v) continue;
    dl.append(el('dt', k), el('dd', v));
  }
  const bodyEl = $('msg-body');
  bodyEl.replaceChildren();
  if (typeof doc.html_safe === 'string') {
    const frame = el('iframe', null, {
      class: 'html', title: 'Message content (HTML)',
      // no allow-scripts, no allow-same-origin: inert, in an opaque origin
      sandbox: 'allow-popups allow-popups-to-escape-sandbox',
      referrerpolicy: 'no-referrer',
    });
    frame.srcdoc = '<!doctype html><meta charset="utf-8"><body>' + doc.html_safe + '</body>';
    bodyEl.append(frame);
  } else {
    bodyEl.append(el('pre', doc.text || '', { class: 'text' }));
  }
  const remote = $('msg-remote');
  remote.hidden = !doc.remote_blocked;
  remote.textContent = doc.remote_blocked ? doc.remote_blocked + ' remote image(s) were not loaded.' : '';
  const list = $('msg-attachments');
  list.replaceChildren();
  const atts = doc.attachments || [];
  $('msg-att-h').hidden = atts.length === 0;
  atts.forEach((att, n) => {
    const li = el('li');
    const b = el('button', 'Download ' + (att.filename || 'attachment ' + n) + ' (' + att.size + ' bytes)', { type: 'button' });
    b.addEventListener('click', () => download(id, n, att.filename || ('attachment-' + n)));
    li.append(b);
    list.append(li);
  });
  focusHeading('msg-subject');
}

async function download(id, n, filename) {
  const { status, doc, resp } = await api(mailboxPath('/' + encodeURIComponent(id) + '/attachments/' + n));
  if (status !== 200) {
    showAlert('Download failed: ' + errorText(status, doc));
    return;
  }
  const url = URL.createObjectURL(await resp.blob());
  const a = el('a', null, { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- compose and follow ----------------------------------------------------------------
function addresses(text) {
  return text.split(',').map((s) => s.trim()).filter(Boolean);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).replace(/^data:[^,]*,/, ''));
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function send(ev) {
  ev.preventDefault();
  const f = ev.target;
  showAlert('');
  const doc = { from: state.address, to: addresses(f.to.value), cc: addresses(f.cc.value),
                bcc: addresses(f.bcc.value), subject: f.subject.value, text: f.text.value };
  for (const k of ['cc', 'bcc']) if (!doc[k].length) delete doc[k];
  const files = Array.from(f.files.files || []);
  if (files.length) {
    doc.attachments = await Promise.all(files.map(async (file) => ({
      filename: file.name, content_type: file.type || 'application/octet-stream',
      content_base64: await readFile(file) })));
  }
  $('send').disabled = true;
  const out = $('send-status');
  $('outbox').hidden = false;
  out.replaceChildren(el('p', 'Sending…'));
  try {
    const key = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random());
    const { status, doc: res } = await api('/v1/messages', {
      method: 'POST', body: JSON.stringify(doc),
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key } });
    if (status !== 202) {
      out.replaceChildren(el('p', 'Not sent (' + status + '): ' + errorText(status, res), { class: 'bad', 'data-state': 'refused' }));
      return;
    }
    f.reset();
    $('c-from').value = state.address;
    await follow(res.id, res.status_url, out);
  } finally {
    $('send').disabled = false;
  }
}

function describe(st) {
  const d = st.detail || {};
  const why = d.message || d.reply || d.reason || d.verdict || '';
  let text = st.state;
  if (st.state === 'deferred' && d.attempt) text += ' (attempt ' + d.attempt + (d.next_attempt_at ? ', next at ' + new Date(d.next_attempt_at * 1000).toLocaleTimeString() : '') + ')';
  if (why) text += ': ' + (typeof why === 'string' ? why : JSON.stringify(why));
  return text;
}

async function follow(id, url, out) {
  const head = el('p', null, { 'data-id': id });
  head.append('Message ', el('code', id), ' ', el('span', 'accepted', { class: 'state', id: 'send-state' }));
  const list = el('ul', null, { id: 'send-recipients' });
  const timeline = el('ol', null, { id: 'send-timeline', 'aria-label': 'Timeline' });
  out.replaceChildren(head, list, timeline);
  const started = Date.now();
  while (Date.now() - started < 120000) {
    const { status, doc } = await api(url);
    if (status === 200) {
      const overall = $('send-state');
      overall.textContent = doc.state;
      overall.className = 'state ' + (BAD.has(doc.state) ? 'bad' : (FINAL.has(doc.state) ? 'ok' : ''));
      list.replaceChildren(...Object.entries(doc.recipients).map(([r, st]) => {
        const li = el('li', r + ': ' + describe(st), { 'data-state': st.state });
        if (BAD.has(st.state)) li.className = 'bad';
        return li;
      }));
      timeline.replaceChildren(...doc.timeline.map((e) => el('li',
        new Date(e.ts * 1000).toLocaleTimeString() + ' ' + e.stage + ': ' + e.state)));
      if (doc.final) return;
    } else if (status !== 404) {
      showAlert('Status unavailable: ' + errorText(status, doc));
    }
    await new Promise((res) => setTimeout(res, 1000));
  }
}

// ---- wiring --------------------------------------------------------------------------
document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    signIn($('token').value.trim());
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('nav-inbox').addEventListener('click', () => openFolder('inbox'));
  $('nav-sent').addEventListener('click', () => openFolder('sent'));
  $('nav-compose').addEventListener('click', () => { show('compose'); focusHeading('compose-h'); });
  $('older').addEventListener('click', () => { state.page += 1; loadPage(); });
  $('newer').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); loadPage(); });
  $('refresh').addEventListener('click', () => loadPage());
  $('back').addEventListener('click', () => loadPage());
  $('compose-form').addEventListener('submit', send);
  const saved = sessionStorage.getItem('mailflow.token');
  if (saved) signIn(saved); else show('signin');
});
