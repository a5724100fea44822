// The passkey page: WebAuthn in the browser, every decision on the server.
// Options and responses use the W3C JSON forms (parse*OptionsFromJSON, toJSON()).
"use strict";

const $ = (id) => document.getElementById(id);
let lastAssertion = null;

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, { credentials: "same-origin", ...init });
  try {
    return await response.json();
  } catch (e) {
    return { ok: false, error: { code: "http_" + response.status, message: response.statusText } };
  }
}

// One line for any reply: what worked, or the refusal's reason and message.
function show(reply, what) {
  const box = $("result");
  box.className = "status " + (reply.ok ? "ok" : "refused");
  let text;
  if (reply.ok) {
    text = what;
  } else if (reply.reason) {
    text = "Refused: " + reply.reason + (reply.message ? " — " + reply.message : "");
  } else if (reply.error) {
    text = "Error: " + reply.error.code + (reply.error.message ? " — " + reply.error.message : "");
  } else {
    text = "Refused.";
  }
  box.textContent = text;
  box.dataset.reason = reply.ok ? "" : (reply.reason || (reply.error && reply.error.code) || "");
  return reply.ok;
}

function showFailure(err) {
  show({ ok: false, error: { code: err.name || "browser_error", message: err.message } });
}

function userName() { return $("user-name").value.trim(); }

async function register() {
  const name = userName();
  if (!name) { return show({ ok: false, error: { code: "invalid_request", message: "type a user name" } }); }
  try {
    const options = await api("/api/register/options", { user_name: name });
    if (!show(options, "…")) return;
    const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(options.options);
    const credential = await navigator.credentials.create({ publicKey });
    const reply = await api("/api/register/verify", { user_name: name, credential: credential.toJSON() });
    if (reply.ok) await refreshSession();
    show(reply, "Passkey registered for " + name + " (credential " + short(reply.credential_id) + ").");
  } catch (err) { showFailure(err); }
}

async function signIn(usernameless) {
  const name = usernameless ? "" : userName();
  if (!usernameless && !name) {
    return show({ ok: false, error: { code: "invalid_request", message: "type a user name" } });
  }
  try {
    const challenge = await api("/api/challenge", usernameless ? {} : { user_name: name });
    if (!show(challenge, "…")) return;
    const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(challenge.options);
    const assertion = await navigator.credentials.get({ publicKey });
    lastAssertion = assertion.toJSON();
    $("replay").disabled = false;
    await verify(lastAssertion);
  } catch (err) { showFailure(err); }
}

async function verify(assertion) {
  const reply = await api("/api/verify", { credential: assertion });
  if (reply.ok) await refreshSession();
  show(reply, "Signed in as " + (reply.user_id || "user handle " + reply.user_handle) + ".");
  return reply;
}

async function replay() {
  if (lastAssertion) {
    try { await verify(lastAssertion); } catch (err) { showFailure(err); }
  }
}

async function refreshSession() {
  const session = await api("/api/session");
  const signedIn = session.ok && session.signed_in;
  $("account").hidden = !signedIn;
  if (!signedIn) return;
  $("account-name").textContent = session.user_id || "(account unknown to this gateway)";
  $("account-handle").textContent = session.user_handle;
  if (session.user_id) $("user-name").value = session.user_id;
  $("add-passkey").disabled = !session.can_add_passkey || !session.user_id;
  await listPasskeys();
}

async function listPasskeys() {
  const reply = await api("/api/passkeys");
  const body = $("passkeys").querySelector("tbody");
  body.replaceChildren();
  if (!reply.ok) { show(reply); return; }
  for (const c of reply.credentials) {
    const row = document.createElement("tr");
    row.dataset.credentialId = c.credential_id;
    for (const value of [short(c.credential_id), when(c.created), when(c.last_used), c.sign_count,
                         c.backup_state ? "yes" : "no"]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    row.children[0].className = "mono";
    row.children[0].title = c.credential_id;
    row.children[3].className = "num";
    const cell = document.createElement("td");
    const button = document.createElement("button");
    button.className = "secondary delete";
    button.textContent = "Delete";
    button.addEventListener("click", () => deletePasskey(c.credential_id));
    cell.append(button);
    row.append(cell);
    body.append(row);
  }
}

async function deletePasskey(id) {
  const reply = await api("/api/passkeys/delete", { credential_id: id });
  if (reply.ok) await listPasskeys();
  show(reply, "Passkey " + short(id) + " deleted.");
}

async function addPasskey() {
  $("user-name").value = $("account-name").textContent;
  await register();
}

async function signOut() {
  await api("/api/signout", {});
  await refreshSession();
  show({ ok: true }, "Signed out.");
}

function short(id) { return id ? id.slice(0, 12) + "…" : ""; }
function when(ms) { return ms ? new Date(ms).toLocaleString() : "never"; }

document.addEventListener("DOMContentLoaded", () => {
  $("register").addEventListener("click", register);
  $("sign-in").addEventListener("click", () => signIn(false));
  $("sign-in-usernameless").addEventListener("click", () => signIn(true));
  $("add-passkey").addEventListener("click", addPasskey);
  $("refresh").addEventListener("click", listPasskeys);
  $("sign-out").addEventListener("click", signOut);
  $("replay").addEventListener("click", replay);
  if (!window.PublicKeyCredential || !PublicKeyCredential.parseCreationOptionsFromJSON) {
    show({ ok: false, error: { code: "unsupported", message: "this browser lacks WebAuthn JSON support" } });
  }
  refreshSession();
});
