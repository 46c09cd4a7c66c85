// Study page: a click on an image shows it enlarged (with its caption) until the next click or Esc.
const zoom = document.getElementById("zoom");
for (const a of document.querySelectorAll("a.zoom")) a.addEventListener("click", e => {
  e.preventDefault();
  document.getElementById("zoom-image").src = a.href;
  document.getElementById("zoom-caption").textContent = a.closest("figure").querySelector("figcaption").textContent;
  zoom.showModal();
});
zoom.addEventListener("click", () => zoom.close());

// Admins: the action buttons POST to the admin API with the session cookie, then reload.
for (const b of document.querySelectorAll("button[data-post]")) b.addEventListener("click", async () => {
  const st = document.getElementById("action-status"); b.disabled = true;
  const r = await fetch(b.dataset.post, {method: "POST", credentials: "same-origin"});
  if (r.ok) { location.reload(); return; }
  const d = await r.json().catch(() => ({})); st.textContent = "Failed: " + (d.detail || r.status); st.className = "error"; b.disabled = false;
});
