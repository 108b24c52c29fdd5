// A static client for the ns capture tests: `getter URL` prints the body of an HTTP GET.
// Built with CGO_ENABLED=0, so it resolves names with Go's own resolver (reading resolv.conf
// and nsswitch.conf itself) and makes its own syscalls: no LD_PRELOAD could see it.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	os.Stdout.Write(body)
}
