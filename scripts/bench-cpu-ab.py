#!/usr/bin/env python3
"""Two builds of `distlock` side by side, one task against each build's own `distlock serve`
(embedded store, temp dir), in interleaved rounds (order alternating), reading besides the rate
the CPU time each acquire + release cycle costs the server (/proc/PID/stat) and the client
(/usr/bin/time): less noisy than the rate when every cycle waits for two fsyncs.

    python3 scripts/bench-cpu-ab.py [ROUNDS]      (BEFORE_BIN and AFTER_BIN from the environment;
                                                    default /tmp/distlock-before, /tmp/distlock-after)

Prints per build the median rate and CPU per cycle, and per round the after/before ratios.
"""
import subprocess, time, os, json, socket, statistics, tempfile, shutil, sys
bins={'before':os.environ.get('BEFORE_BIN','/tmp/distlock-before'),'after':os.environ.get('AFTER_BIN','/tmp/distlock-after')}
def free_port():
    s=socket.socket(); s.bind(('127.0.0.1',0)); p=s.getsockname()[1]; s.close(); return p
def cpu(pid):
    f=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK')
res={'before':[], 'after':[]}
rounds=int(sys.argv[1]) if len(sys.argv)>1 else 6
for r in range(rounds):
    order=['before','after'] if r%2==0 else ['after','before']
    for b in order:
        d=tempfile.mkdtemp(); port=free_port()
        srv=subprocess.Popen([bins[b],'serve','--listen',f'127.0.0.1:{port}','--data-dir',d],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,env={**os.environ,'DISTLOCK_LOG':'warn'})
        for _ in range(100):
            try: socket.create_connection(('127.0.0.1',port),0.1).close(); break
            except OSError: time.sleep(0.05)
        c0=cpu(srv.pid); t0=time.time()
        out=subprocess.run(['/usr/bin/time','-f','%U %S',bins[b],'--backend',f'http://127.0.0.1:{port}','--json','-q','bench','--concurrency','1','--duration','3s'],capture_output=True,text=True)
        c1=cpu(srv.pid)
        j=json.loads(out.stdout); u,s=map(float,out.stderr.strip().split()[-2:])
        cyc=j['cycles']
        res[b].append({'ops':j['ops_per_s'],'server_us':(c1-c0)/cyc*1e6,'client_us':(u+s)/cyc*1e6})
        srv.terminate(); srv.wait(); shutil.rmtree(d)
for b in res:
    print(b, 'ops med %.0f'%statistics.median(x['ops'] for x in res[b]), 'server CPU us/cycle med %.1f (%.1f-%.1f)'%(statistics.median(x['server_us'] for x in res[b]),min(x['server_us'] for x in res[b]),max(x['server_us'] for x in res[b])), 'client CPU us/cycle med %.1f (%.1f-%.1f)'%(statistics.median(x['client_us'] for x in res[b]),min(x['client_us'] for x in res[b]),max(x['client_us'] for x in res[b])))
for k in ['ops','server_us','client_us']:
    ratios=[a[k]/b[k] for a,b in zip(res['after'],res['before'])]
    print(k, 'after/before per round', [round(x,2) for x in ratios], 'median %.2f'%statistics.median(ratios))
