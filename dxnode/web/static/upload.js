// Upload page: send the chosen or dropped file to POST /api/predict and show the findings and heatmap.
const drop = document.getElementById("drop"), input = document.getElementById("file"), statusEl = document.getElementById("status");
function esc(s){return String(s??"").replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
async function send(file){
  statusEl.textContent = "Analysing " + file.name + " ..."; document.getElementById("result").hidden = true;
  const body = new FormData(); body.append("file", file);
  const r = await fetch("/api/predict?top_k=3", {method:"POST", body, credentials:"same-origin"});
  const d = await r.json().catch(() => ({}));  // a proxy's error page is not JSON
  if (!r.ok) { statusEl.textContent = `Error ${r.status}: ` + (d.detail || r.statusText); statusEl.className = "error"; return; }
  statusEl.textContent = file.name; statusEl.className = "";
  document.querySelector("#predictions tbody").innerHTML = d.findings.map(f => `<tr><td>${esc(f.label)}</td><td class="num">${f.probability.toFixed(3)}</td><td>${f.positive?'<span class="badge pos">positive</span>':'<span class="badge">negative</span>'}</td></tr>`).join("");
  document.getElementById("model-id").textContent = `${d.model.name} ${d.model.version}` + (d.model.demo ? " - UNTRAINED DEMO MODEL" : "");
  document.getElementById("preview").src = d.image_png; document.getElementById("heatmap").src = d.heatmap_png;
  document.getElementById("result").hidden = false;
}
input.addEventListener("change", () => input.files[0] && send(input.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
