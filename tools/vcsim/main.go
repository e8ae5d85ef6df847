// vmt-vcsim: govmomi's vCenter simulator (a VPX model) as a daemon for VMThunder's tests.
//
// Listens on -listen (loopback only), demands the credentials from the environment
// (VMT_VCSIM_USERNAME, VMT_VCSIM_PASSWORD: never on the command line, where ps shows them),
// writes its PID to -pidfile once it answers, and stops on SIGTERM or SIGINT.
//
// -fail-create-every N (tests' fault injection, govmomi 0.24 has none of its own): once armed
// by SIGUSR1 (which restarts the count), every Nth CreateVM_Task of the datacenter's VM folder
// returns a task that fails with InsufficientResourcesFault, creating nothing; SIGUSR2
// disarms it. Each change is logged ("vmt-vcsim: faults armed" / "disarmed").
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// faultyFolder is the VM folder with every Nth CreateVM_Task failing as a task. It holds the
// folder by value, replacing it in the registry: the simulator's property collector digs the
// mo.Folder out of a wrapper's first field only through structs, not pointers.
type faultyFolder struct {
	simulator.Folder
	every int
	mu    sync.Mutex
	armed bool
	calls int
}

func (f *faultyFolder) arm(armed bool) {
	f.mu.Lock()
	f.armed, f.calls = armed, 0
	f.mu.Unlock()
}

func (f *faultyFolder) CreateVMTask(ctx *simulator.Context, c *types.CreateVM_Task) soap.HasFault {
	f.mu.Lock()
	f.calls++
	fail := f.armed && f.calls%f.every == 0
	f.mu.Unlock()
	if !fail {
		return f.Folder.CreateVMTask(ctx, c)
	}
	task := simulator.CreateTask(&f.Folder, "createVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.InsufficientResourcesFault{}
	})
	return &methods.CreateVM_TaskBody{Res: &types.CreateVM_TaskResponse{Returnval: task.Run()}}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8989", "host:port to serve /sdk on (loopback)")
	pidfile := flag.String("pidfile", "", "file to write the PID to once listening")
	clusterHosts := flag.Int("cluster-hosts", 3, "ESXi hosts in the cluster")
	machines := flag.Int("vms", 2, "foreign VMs created per resource pool")
	failEvery := flag.Int("fail-create-every", 0, "fail every Nth CreateVM_Task (0: never)")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		log.Fatalf("-listen %q: %v", *listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		log.Fatalf("-listen %q: only a loopback address is allowed", *listen)
	}
	user, pass := os.Getenv("VMT_VCSIM_USERNAME"), os.Getenv("VMT_VCSIM_PASSWORD")
	if user == "" || pass == "" {
		log.Fatal("VMT_VCSIM_USERNAME and VMT_VCSIM_PASSWORD must be set")
	}

	model := simulator.VPX()
	model.ClusterHost = *clusterHosts
	model.Machine = *machines
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	defer model.Remove()
	var faulty *faultyFolder
	if *failEvery > 0 {
		dc := simulator.Map.Any("Datacenter").(*simulator.Datacenter)
		folder := simulator.Map.Get(dc.VmFolder).(*simulator.Folder)
		faulty = &faultyFolder{Folder: *folder, every: *failEvery} // copied before any use
		simulator.Map.Put(faulty)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(user, pass)}
	server := model.Service.NewServer()
	defer server.Close()

	if *pidfile != "" {
		if err := os.WriteFile(*pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			log.Fatalf("-pidfile %q: %v", *pidfile, err)
		}
	}
	fmt.Printf("vmt-vcsim: serving http://%s/sdk\n", *listen)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	faults := make(chan os.Signal, 1)
	if faulty != nil {
		signal.Notify(faults, syscall.SIGUSR1, syscall.SIGUSR2)
	}
	for {
		select {
		case <-stop:
			return
		case sig := <-faults:
			armed := sig == syscall.SIGUSR1
			faulty.arm(armed)
			if armed {
				fmt.Println("vmt-vcsim: faults armed")
			} else {
				fmt.Println("vmt-vcsim: faults disarmed")
			}
		}
	}
}
