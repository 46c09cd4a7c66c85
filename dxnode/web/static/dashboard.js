// Dashboard: refresh the counters and recent studies every 5 s from /dashboard.json.
function pn(v){const p=String(v??"").split("=")[0].split("^");const g=p.slice(1,3).filter(x=>x).join(" ");return p[0]&&g?`${p[0]}, ${g}`:(p[0]||g);}
function esc(s){return String(s??"").replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
async function refresh(){
  const r = await fetch("/dashboard.json", {credentials:"same-origin"}); if(!r.ok) return; const d = await r.json();
  for (const [k,v] of Object.entries(d.counters)) { const el=document.getElementById("c-"+k); if(el) el.textContent=v; }
  const rows = d.studies.map(st => `<tr><td><a href="/studies/${esc(st.study_instance_uid)}">${esc(pn(st.patient_name)||st.patient_id||"(no name)")}</a><div class="uid">${esc(st.patient_id)}</div></td>
   <td>${esc(st.accession_number)}</td><td>${esc(st.study_date_shown)}</td><td>${esc(st.modalities)}</td><td class="num">${st.num_instances}</td><td>${esc(st.calling_aet)}</td>
   <td>${esc(st.last_received_shown)}</td><td><span class="badge ${esc(st.state)}">${esc(st.state)}</span></td>
   <td>${st.top.map(f=>`<span class="badge ${f.positive?"pos":""}">${esc(f.label)} ${f.probability.toFixed(2)}</span>`).join(" ")}</td></tr>`).join("");
  if (rows) document.querySelector("#studies tbody").innerHTML = rows;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
setInterval(refresh, 5000);
