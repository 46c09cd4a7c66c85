// Study page (admins): the action buttons POST to the admin API with the session cookie, then reload.
for (const b of document.querySelectorAll("button[data-post]")) b.addEventListener("click", async () => {
  const st = document.getElementById("action-status"); b.disabled = true;
  const r = await fetch(b.dataset.post, {method: "POST", credentials: "same-origin"});
  if (r.ok) { location.reload(); return; }
  const d = await r.json().catch(() => ({})); st.textContent = "Failed: " + (d.detail || r.status); st.className = "error"; b.disabled = false;
});
